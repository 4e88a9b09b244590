"""What a file is, from its first bytes: never from its name or the type its sender claims."""

from __future__ import annotations

from typing import Literal, NamedTuple

from ..errors import BadAttachment

Kind = Literal["image", "text", "pdf"]

# Enough bytes to tell every accepted type (and to read an image's header).
SNIFF_BYTES = 64


class Sniffed(NamedTuple):
    kind: Kind
    content_type: str


_IMAGES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
# Refused by name, so that the error says what the file is. Anything else that is not valid
# UTF-8 is refused by the text check.
_REFUSED: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a zip archive (or a document made of one)"),
    (b"PK\x05\x06", "a zip archive"),
    (b"MZ", "a Windows executable"),
    (b"\x7fELF", "an ELF executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O or Java class file"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"#!", "a script with an interpreter line"),
)


def sniff(head: bytes) -> Sniffed:
    """The kind and type of a file from its first `SNIFF_BYTES`; text is only a guess here (the
    whole file must still decode as UTF-8). Raises `BadAttachment` for a refused type."""
    for magic, content_type in _IMAGES:
        if head.startswith(magic):
            return Sniffed("image", content_type)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("image", "image/webp")
    if head.startswith(b"%PDF-"):
        return Sniffed("pdf", "application/pdf")
    for magic, what in _REFUSED:
        if head.startswith(magic):
            raise BadAttachment(f"the file is {what}: only images, text and PDFs are accepted")
    if b"\x00" in head:
        raise BadAttachment("the file is binary: only images, text and PDFs are accepted")
    return Sniffed("text", "text/plain; charset=utf-8")
