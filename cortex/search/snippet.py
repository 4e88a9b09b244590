"""A hit's snippet: about 200 characters of plain text around its best match, and where in it
the query's words are, as [start, end) ranges. Computed here, from the stored text, so both
databases give the same snippet for the same hit (FTS5's snippet() and ts_headline() differ,
and both return markup)."""

from __future__ import annotations

from .query import Query, Term, word_spans

SNIPPET_CHARS = 200
LEAD = 60  # characters of context before the match the snippet is centred on
SCAN_CHARS = 100_000  # as far as the index reads a text
MAX_MATCHES = 200
ELLIPSIS = "…"


def _matches(spans: list[tuple[int, int, str]], term: Term) -> list[tuple[int, int]]:
    """The character ranges where `term` occurs among the words of a text."""
    words = term.words
    found: list[tuple[int, int]] = []
    last = len(words) - 1
    for i in range(len(spans) - last):
        for j, word in enumerate(words):
            have = spans[i + j][2]
            if not (have == word or (term.prefix and j == last and have.startswith(word))):
                break
        else:
            found.append((spans[i][0], spans[i + last][1]))
            if len(found) >= MAX_MATCHES:
                break
    return found


def snippet(text: str, query: Query) -> tuple[str, list[tuple[int, int]]]:
    """(snippet, highlights) for a hit on `text`."""
    text = text[:SCAN_CHARS]
    spans = word_spans(text)
    hits = sorted(
        (start, end, n)
        for n, term in enumerate(query.positive)
        for start, end in _matches(spans, term)
    )
    # The best match: the one whose window shows the most different terms (the earliest of
    # equals).
    lo, anchor, best_count = 0, 0, 0
    for start, _end, _n in hits[:MAX_MATCHES]:
        window = max(0, start - LEAD)
        count = len({n for s, e, n in hits if s >= window and e <= window + SNIPPET_CHARS})
        if count > best_count:
            lo, anchor, best_count = window, start, count
    if lo > 0:  # start at a word, not inside one
        space = text.find(" ", lo, anchor)
        lo = space + 1 if space >= 0 else lo
    hi = min(len(text), lo + SNIPPET_CHARS)
    if hi < len(text):
        space = text.rfind(" ", hi - 20, hi)
        hi = space if space > lo else hi
    head = ELLIPSIS if lo > 0 else ""
    tail = ELLIPSIS if hi < len(text) else ""
    body = text[lo:hi].translate({ord(c): " " for c in "\n\r\t\v\f"})
    shift = len(head) - lo
    ranges: list[tuple[int, int]] = []
    for start, end, _n in hits:
        if start >= lo and end <= hi:
            if ranges and start + shift <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end + shift))
            else:
                ranges.append((start + shift, end + shift))
    return head + body + tail, ranges
