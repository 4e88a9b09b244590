"""Joining a reply's `delta` events by offset, as a client must, and saying what went wrong.

A `delta` carries the `offset` in the reply's text where its `text` goes. A client that sees
every delta of a reply from the start joins them end to end; one that reconnects and catches
up may see a piece again (a repeat, which must match what it has). A delta past the end of the
text so far means text went missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

__all__ = ["Joined", "ReplyText", "join_deltas"]

Joined = Literal["next", "repeat", "mismatch", "gap"]


class ReplyText:
    """The text of one reply so far, joined from its deltas."""

    __slots__ = ("text",)

    def __init__(self, text: str = "") -> None:
        self.text = text

    def add(self, offset: int, piece: str) -> Joined:
        """Join the delta `piece` at `offset`; say how it joined.

        "next": it continues the text. "repeat": it overlaps the text (what it adds past the
        end, if anything, is joined) and matches it. "mismatch": it overlaps the text but
        differs (joined the same way: the text up to `offset`, then the piece, when that is
        longer). "gap": it starts past the end, so text is missing before it; the text is left
        as it was.
        """
        have = self.text
        if offset == len(have):
            self.text = have + piece
            return "next"
        if offset > len(have):
            return "gap"
        matches = piece.startswith(have[offset : offset + len(piece)])
        if offset + len(piece) > len(have):
            self.text = have[:offset] + piece
        return "repeat" if matches else "mismatch"


def join_deltas(pieces: Iterable[tuple[int, str]]) -> tuple[str, str]:
    """The text of (offset, text) deltas that must continue one another exactly, and what is
    wrong with them ("" when nothing): a repeat, a mismatch or a gap is an error here."""
    reply = ReplyText()
    for offset, piece in pieces:
        position = len(reply.text)
        if reply.add(offset, piece) != "next":
            return reply.text, f"delta at offset {offset} where {position} was expected"
    return reply.text, ""
