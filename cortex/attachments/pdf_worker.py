"""The PDF worker process: `python -m cortex.attachments.pdf_worker PAGES CHARS MEMORY CPU`.

Reads a PDF on stdin, writes `{"pages": n, "text": ...}` or `{"error": ...}` on stdout. It limits
itself first (address space, CPU time), so a PDF bomb ends this process, never the server.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any


def limit(memory_bytes: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))


def read(data: bytes, max_pages: int, max_chars: int) -> dict[str, Any]:
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError, PyPdfError

    logging.disable(logging.WARNING)  # pypdf warns about every odd object on stderr
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = bool(reader.decrypt(""))  # an empty user password opens it
            except Exception:
                opened = False
            if not opened:
                return {"error": "the PDF is encrypted: upload it without a password"}
        pages = len(reader.pages)
        parts: list[str] = []
        chars = 0
        for page in reader.pages[:max_pages]:
            text = page.extract_text() or ""
            parts.append(text)
            chars += len(text)
            if chars >= max_chars:
                break
    except MemoryError:
        return {"error": "the PDF needs too much memory to read"}
    except RecursionError:
        return {"error": "the PDF nests its objects too deeply"}
    except (
        PdfReadError,
        PyPdfError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        return {"error": f"the PDF cannot be read: {type(exc).__name__}"}
    text = "\n\n".join(part.strip() for part in parts if part.strip())[:max_chars]
    return {"pages": pages, "text": text}


def main(argv: list[str]) -> int:
    max_pages, max_chars, memory_bytes, cpu_s = (int(a) for a in argv[:4])
    limit(memory_bytes, cpu_s)
    data = sys.stdin.buffer.read()
    try:
        answer = read(data, max_pages, max_chars)
    except MemoryError:
        answer = {"error": "the PDF needs too much memory to read"}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
