"""The search query language, parsed by Cortex and never passed raw to a database.

Words must all match, `"exact phrases"` match in order, `prefix*` matches the start of a word,
and `-term` excludes. Parsing is forgiving: an unclosed quote closes at the end, lone operators
are ignored, and words such as OR, AND or NEAR are searched as words (there are no stop words).
Only an oversize query is an error. The result compiles to an FTS5 MATCH string in which every
term is a quoted string, and to a tsquery built from bind parameters: the user's characters can
never be read as syntax by either database.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from ..errors import TooLarge

MAX_QUERY_CHARS = 1000
MAX_TERMS = 32  # beyond this a query is no longer something a person types


@dataclass(frozen=True)
class Term:
    """One word, phrase or prefix: `text` as typed (sans operators), `words` folded."""

    text: str
    words: tuple[str, ...]
    prefix: bool = False
    negated: bool = False


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]

    @property
    def positive(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if not t.negated)

    @property
    def negative(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.negated)

    @property
    def empty(self) -> bool:
        """No word to search for: the query has no hits (exclusions alone select nothing)."""
        return not self.positive

    def key(self) -> str:
        """A canonical form, so that a cursor can be tied to the query it pages."""
        return " ".join(
            ("-" if t.negated else "") + "+".join(t.words) + ("*" if t.prefix else "")
            for t in self.terms
        )


def fold(word: str) -> str:
    """A word as both indexes compare it: accents removed, case folded (no stemming)."""
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# A word: letters and digits, with combining accents inside it (a decomposed é is one letter).
MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
WORD = re.compile(f"[^\\W_](?:[^\\W_]|[{MARKS}])*")


def word_spans(text: str) -> list[tuple[int, int, str]]:
    """Each word of `text` as (start, end, folded), split as unicode61 splits text."""
    return [
        (m.start(), m.end(), m.group().lower() if m.group().isascii() else fold(m.group()))
        for m in WORD.finditer(text)
    ]


def _clean(raw: str) -> str:
    """Control characters and lone surrogates become spaces: no database accepts a NUL."""
    return "".join(" " if unicodedata.category(c) in ("Cc", "Cs", "Cf") else c for c in raw)


def parse(raw: str) -> Query:
    """The query in `raw`; raises `TooLarge` past `MAX_QUERY_CHARS`, never anything else."""
    if len(raw) > MAX_QUERY_CHARS:
        raise TooLarge(f"a search query is at most {MAX_QUERY_CHARS} characters")
    text = _clean(raw)
    terms: list[Term] = []
    i, n = 0, len(text)
    while i < n and len(terms) < MAX_TERMS:
        if text[i].isspace():
            i += 1
            continue
        negated = False
        while i < n and text[i] == "-":
            negated = True
            i += 1
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end
            chunk = text[i + 1 : end]
            i = end + 1
            prefix = i < n and text[i] == "*"
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] != '"':
                i += 1
            chunk = text[start:i]
            prefix = chunk.endswith("*")
        while i < n and text[i] == "*":
            i += 1
        words = tuple(w for _, _, w in word_spans(chunk))
        if words:  # a lone -, *, or punctuation is no term
            terms.append(Term(chunk.replace("*", " ").strip(), words, prefix, negated))
    return Query(tuple(terms))


def _fts5_term(term: Term) -> str:
    # A double-quoted FTS5 string is always a phrase of the tokenizer's tokens; a quote inside
    # is doubled. Nothing in it is an operator, a column name or a NEAR group.
    quoted = '"' + term.text.replace('"', '""') + '"'
    return quoted + " *" if term.prefix else quoted


def to_fts5(query: Query, column: str = "body") -> str:
    """The query as an FTS5 expression restricted to `column` ("" if it has no hits)."""
    if query.empty:
        return ""
    expr = f"{column} : (" + " AND ".join(_fts5_term(t) for t in query.positive) + ")"
    if query.negative:
        expr = (
            f"({expr}) NOT {column} : (" + " OR ".join(_fts5_term(t) for t in query.negative) + ")"
        )
    return expr


def to_tsquery(query: Query, prefix: str = "q") -> tuple[str, dict[str, Any]]:
    """The query as a PostgreSQL tsquery expression over bind parameters, and the parameters.

    A word or phrase goes through `phraseto_tsquery`, so PostgreSQL splits it as it split the
    text; a prefix is built by Cortex from folded words (letters and digits only, each quoted)
    because only `to_tsquery` knows `:*`.
    """
    if query.empty:
        return "", {}
    params: dict[str, Any] = {}
    parts: list[str] = []
    for i, term in enumerate(query.terms):
        name = f"{prefix}{i}"
        # Letters and digits only, so a lexeme's quotes can't be closed from inside it.
        words = ["".join(c for c in w if c.isalnum()) for w in term.words]
        if term.prefix and all(words):
            lexemes = [f"'{w}'" for w in words]
            lexemes[-1] += ":*"
            params[name] = " <-> ".join(lexemes)
            sql = f"to_tsquery('simple', cortex_unaccent(:{name}))"
        else:
            params[name] = term.text
            sql = f"phraseto_tsquery('simple', cortex_unaccent(:{name}))"
        parts.append(f"!!{sql}" if term.negated else sql)
    return "(" + " && ".join(parts) + ")", params
