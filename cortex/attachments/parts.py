"""What the model gets for a message with attachments: OpenAI-style content parts.

Each attachment is headed by a text part naming it (`[Attached image: cat.png, 640x480]`), so a
model knows which file is which, and the mock model can say what it received.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import image

# A PDF's text as the model gets it, at most (its stored text may be longer).
MODEL_PDF_CHARS = 100_000
_HEADER = re.compile(r"^\[Attached (image|file|PDF): ([^\]\n]*)\]", re.M)


class ModelAttachment(NamedTuple):
    """An attachment as the model gets it: metadata, its text, and (images) its bytes."""

    filename: str
    kind: str
    content_type: str
    width: int | None
    height: int | None
    pages: int | None
    text: str | None
    data: bytes | None  # images only


def header(a: ModelAttachment) -> str:
    if a.kind == "image":
        return f"[Attached image: {a.filename}, {a.width}x{a.height}]"
    if a.kind == "pdf":
        chars = len(a.text or "")
        return f"[Attached PDF: {a.filename}, {a.pages} pages, {chars:,} characters]"
    return f"[Attached file: {a.filename}]"


def content_parts(
    text: str,
    attachments: Sequence[ModelAttachment],
    *,
    scale: Callable[[bytes, str], tuple[str, bytes]] = image.for_model,
) -> list[dict[str, Any]]:
    """The user message's `content`: its text, then each attachment headed by its name.

    Images are passed through `scale` (the pipeline scales them beforehand, in threads, and
    passes `as_is`)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text.strip() else []
    for a in attachments:
        if a.kind == "image":
            assert a.data is not None
            content_type, data = scale(a.data, a.content_type)
            url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            parts.append({"type": "text", "text": header(a)})
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif a.kind == "pdf":
            body = (a.text or "")[:MODEL_PDF_CHARS]
            if not body:
                body = "(This PDF has no text layer: it is probably scanned. Its text is unknown.)"
            parts.append({"type": "text", "text": f"{header(a)}\n{body}"})
        else:
            parts.append({"type": "text", "text": f"{header(a)}\n{a.text or ''}"})
    return parts


def as_is(data: bytes, content_type: str) -> tuple[str, bytes]:
    return content_type, data


def describe(content: Any) -> str:
    """What a message's parts carry, in words: "1 image (cat.png, 640x480); 1 PDF (...)".

    "" for plain text. The mock model says this, so attachments visibly work with no key.
    """
    if not isinstance(content, list):
        return ""
    found: dict[str, list[str]] = {"image": [], "file": [], "PDF": []}
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            for kind, what in _HEADER.findall(str(part.get("text", ""))):
                found[kind].append(what)
    names = {
        "image": ("image", "images"),
        "file": ("text file", "text files"),
        "PDF": ("PDF", "PDFs"),
    }
    out = []
    for kind, items in found.items():
        if items:
            one, many = names[kind]
            out.append(f"{len(items)} {one if len(items) == 1 else many} ({'; '.join(items)})")
    return "; ".join(out)


def text_of(content: Any) -> str:
    """The user's own text of a message's content (the first text part of a list)."""
    if isinstance(content, list):
        first = next((p for p in content if isinstance(p, dict) and p.get("type") == "text"), None)
        return str(first.get("text", "")) if first else ""
    return str(content or "")
