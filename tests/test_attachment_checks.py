"""The attachments room: every file is judged by its bytes (docs/attachments.md)."""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import AsyncIterator

import pytest
from attach_samples import (
    blank_pdf,
    encrypted_pdf,
    jpeg,
    pdf,
    pdf_bomb,
    pdf_nested,
    png,
    png_bomb,
)
from PIL import Image

from cortex.attachments import image, parts
from cortex.attachments import pdf as pdf_text
from cortex.attachments.sniff import sniff
from cortex.attachments.text import TextDecoder, decode
from cortex.errors import BadAttachment


async def _one(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 65_536):
        yield data[start : start + 65_536]


def test_the_type_comes_from_the_bytes() -> None:
    assert sniff(png()[:64]) == ("image", "image/png")
    assert sniff(jpeg()[:64]) == ("image", "image/jpeg")
    assert sniff(pdf(["x"])[:64]) == ("pdf", "application/pdf")
    assert sniff(b"a,b\n1,2\n").kind == "text"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"PK\x03\x04" + b"\x00" * 60, "zip"),
        (b"MZ\x90\x00" + b"\x00" * 60, "Windows executable"),
        (b"\x7fELF\x02\x01\x01" + b"\x00" * 57, "ELF"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 60, "gzip"),
        (b"#!/bin/sh\nrm -rf /\n", "script"),
        (b"abc\x00def", "binary"),
    ],
)
def test_archives_executables_and_binaries_are_refused(data: bytes, what: str) -> None:
    with pytest.raises(BadAttachment, match=what):
        sniff(data[:64])


def test_an_image_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_bomb()
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(BadAttachment, match="pixels"):
        image.inspect(bomb)
    assert time.perf_counter() - started < 0.5  # 2.5 gigapixels were never decoded


def test_an_image_header_gives_its_size_and_type() -> None:
    assert image.inspect(png(640, 480)) == (640, 480, "image/png")
    with pytest.raises(BadAttachment, match="header"):
        image.inspect(b"\x89PNG\r\n\x1a\n garbage")


def test_a_large_image_is_scaled_to_the_providers_limit() -> None:
    content_type, data = image.for_model(png(4096, 1024), "image/png")
    assert content_type == "image/png"
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (2048, 512)
    small = png(100, 100)
    assert image.for_model(small, "image/png") == ("image/png", small)


def test_text_must_be_utf8_and_is_cut_with_a_mark() -> None:
    with pytest.raises(BadAttachment, match="UTF-8"):
        decode("café".encode("latin-1"))
    assert decode("\ufeffhello".encode()) == "hello"
    cut = decode(b"x" * 50, limit=10)
    assert cut.startswith("x" * 10) and "cut" in cut and "x" * 11 not in cut
    # a character split between two pieces decodes whole
    decoder = TextDecoder()
    raw = "é".encode()
    decoder.feed(raw[:1])
    decoder.feed(raw[1:], final=True)
    assert decoder.text() == "é"


async def test_pdf_text_is_extracted_in_a_worker() -> None:
    found = await pdf_text.extract(_one(pdf(["Hello page one", "And page two"])))
    assert found.pages == 2
    assert "Hello page one" in found.text and "And page two" in found.text
    blank = await pdf_text.extract(_one(blank_pdf(3)))
    assert blank == (3, "")


async def test_an_encrypted_pdf_is_refused_clearly() -> None:
    with pytest.raises(BadAttachment, match="encrypted"):
        await pdf_text.extract(_one(encrypted_pdf()))


async def test_a_broken_pdf_is_refused() -> None:
    with pytest.raises(BadAttachment, match="cannot be read|could not be read"):
        await pdf_text.extract(_one(b"%PDF-1.7\nnothing else"))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """120 KB that pypdf reads for 7 s with 400 MB before its own token limit stops it."""
    return pdf_bomb()


async def test_a_pdf_bomb_is_bounded_in_memory(bomb: bytes) -> None:
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(BadAttachment, match="memory"):
        await pdf_text.extract(_one(bomb), memory_bytes=192 * 1_048_576)
    assert time.perf_counter() - started < 5  # ended by the bound, not by pypdf's own limit


async def test_a_pdf_bomb_is_bounded_in_time(bomb: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(BadAttachment, match="took more than"):
        await pdf_text.extract(_one(bomb), timeout_s=1.0)
    assert time.perf_counter() - started < 3


async def test_deep_nesting_is_refused() -> None:
    with pytest.raises(BadAttachment):
        await pdf_text.extract(_one(pdf_nested()))


def test_the_model_gets_exact_parts_and_the_mock_can_describe_them() -> None:
    cat = parts.ModelAttachment("cat.png", "image", "image/png", 64, 48, None, None, png())
    notes = parts.ModelAttachment("notes.txt", "text", "text/plain", None, None, None, "hi", None)
    doc = parts.ModelAttachment("doc.pdf", "pdf", "application/pdf", None, None, 3, "", None)
    content = parts.content_parts("look", [cat, notes, doc])
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert content == [
        {"type": "text", "text": "look"},
        {"type": "text", "text": "[Attached image: cat.png, 64x48]"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "[Attached file: notes.txt]\nhi"},
        {
            "type": "text",
            "text": "[Attached PDF: doc.pdf, 3 pages, 0 characters]\n(This PDF has no text "
            "layer: it is probably scanned. Its text is unknown.)",
        },
    ]
    assert parts.describe(content) == (
        "1 image (cat.png, 64x48); 1 text file (notes.txt); 1 PDF (doc.pdf, 3 pages, 0 characters)"
    )
    assert parts.text_of(content) == "look"


def test_trimming_counts_attachment_text_and_images() -> None:
    """LiteLLM's trim_messages fails on content parts: Cortex trims those histories itself."""
    from cortex.config import Settings
    from cortex.llm.service import LlmService

    llm = LlmService(Settings(_env_file=None))  # type: ignore[call-arg]
    old = [
        {"role": "user", "content": "old question " * 10_000},
        {"role": "assistant", "content": "old answer"},
    ]
    big = parts.ModelAttachment(
        "a.txt", "text", "text/plain", None, None, None, "w " * 120_000, None
    )
    noise = io.BytesIO()
    Image.frombytes("RGB", (300, 300), random.Random(1).randbytes(270_000)).save(noise, "PNG")
    photo = noise.getvalue()
    assert len(photo) * 3 > 128_000  # past Cortex's byte bound: the images are counted
    cat = parts.ModelAttachment("cat.png", "image", "image/png", 300, 300, None, None, photo)
    heavy = {"role": "user", "content": parts.content_parts("look", [big])}
    trimmed = llm.trim([*old, heavy], "gpt-4o-mini")  # 128k window: the file fills most of it
    assert trimmed == [heavy]
    light = {"role": "user", "content": parts.content_parts("look", [cat, cat, cat])}
    assert llm.trim([*old, light], "gpt-4o-mini") == [*old, light]  # images: ~1,100 tokens each


def test_scaled_images_are_kept_within_their_byte_budget_least_recent_out_first() -> None:
    from cortex.pipeline.files import ScaledImages

    cache = ScaledImages(budget=10)
    cache.put("a", ("image/png", b"1234"))
    cache.put("b", ("image/png", b"5678"))
    assert cache.get("a") == ("image/png", b"1234")  # a is now the most recent
    cache.put("c", ("image/png", b"90ab"))  # 12 bytes: b, the least recent, goes
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", ("image/png", b"x" * 11))  # larger than the budget: never kept
    assert cache.get("huge") is None and cache.get("c") is not None
