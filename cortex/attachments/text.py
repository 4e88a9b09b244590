"""Text files: strict UTF-8, decoded as the bytes arrive, and cut at a documented limit."""

from __future__ import annotations

import codecs

from ..errors import BadAttachment

# What a text file gives the model at most: about 25,000 tokens.
TEXT_CHARS = 100_000
CUT_MARK = "\n[... cut: the file is longer than {limit:,} characters ...]"


class TextDecoder:
    """Decodes a file piece by piece: memory is the kept text, never the whole file."""

    def __init__(self, limit: int = TEXT_CHARS) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
        self._parts: list[str] = []
        self._kept = 0
        self.chars = 0
        self.limit = limit

    def feed(self, data: bytes, *, final: bool = False) -> None:
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            raise BadAttachment("the file is not valid UTF-8 text") from exc
        if "\x00" in text:
            raise BadAttachment("the file is binary: it holds NUL characters")
        self.chars += len(text)
        room = self.limit - self._kept
        if room > 0:
            self._parts.append(text[:room])
            self._kept += min(room, len(text))

    def text(self) -> str:
        """The kept text, with the cut marked when the file was longer."""
        kept = "".join(self._parts)
        return kept + CUT_MARK.format(limit=self.limit) if self.chars > self.limit else kept


def decode(data: bytes, limit: int = TEXT_CHARS) -> str:
    decoder = TextDecoder(limit)
    decoder.feed(data, final=True)
    return decoder.text()
