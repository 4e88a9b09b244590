"""PDF text, extracted by pypdf in a worker process with real bounds.

A thread cannot be stopped, and a crafted PDF (deep nesting, huge streams) can make a parser
spin or allocate without end. So each PDF is read by a child process (`pdf_worker`) that caps its
own address space and CPU time with `setrlimit`, and that the server kills at a wall-clock
deadline. The server's memory holds only the JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterable
from typing import NamedTuple

from ..errors import BadAttachment

PDF_PAGES = 200  # pages read at most
PDF_CHARS = 200_000  # characters kept at most (the model is sent fewer: see parts)
PDF_TIMEOUT_S = 20.0  # wall clock for one PDF, start-up included
PDF_MEMORY_BYTES = 768 * 1_048_576  # the worker's address space
PDF_CPU_S = 15  # the worker's CPU time


class PdfText(NamedTuple):
    pages: int
    text: str  # "" when the PDF has no text layer


async def extract(
    chunks: AsyncIterable[bytes],
    *,
    max_pages: int = PDF_PAGES,
    max_chars: int = PDF_CHARS,
    timeout_s: float = PDF_TIMEOUT_S,
    memory_bytes: int = PDF_MEMORY_BYTES,
    cpu_s: int = PDF_CPU_S,
) -> PdfText:
    """The text of the PDF whose bytes `chunks` yields, read in a bounded worker process."""
    args = [str(max_pages), str(max_chars), str(memory_bytes), str(cpu_s)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.attachments.pdf_worker",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None

    async def run() -> bytes:
        assert proc.stdin is not None
        try:
            async for chunk in chunks:
                proc.stdin.write(chunk)
                await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker died (a limit): its exit says why
        out, _ = await proc.communicate()
        return out

    try:
        out = await asyncio.wait_for(run(), timeout_s)
    except TimeoutError as exc:
        raise BadAttachment(f"the PDF took more than {timeout_s:g} s to read") from exc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    try:
        answer = json.loads(out)
    except ValueError:
        answer = {"error": "the PDF could not be read within the worker's memory and time"}
    if "error" in answer:
        raise BadAttachment(str(answer["error"]))
    return PdfText(int(answer["pages"]), str(answer["text"]))
