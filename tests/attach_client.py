"""Uploading over a test client's WebSocket."""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy import func, select

from cortex.app import Cortex
from cortex.store.models import Attachment, AttachmentChunk

_ids = itertools.count(1)


async def upload(
    client: Any, data: bytes, filename: str = "file.bin", *, piece: int = 65_536, **extra: Any
) -> dict[str, Any]:
    """Announce, send the bytes, and return the answer: `attachment` or `error`."""
    rid = f"up{next(_ids)}"
    await client.send(type="upload", filename=filename, size=len(data), request_id=rid, **extra)
    for start in range(0, len(data), piece):
        await client.ws.send(data[start : start + piece])
    events = await client.until(lambda e: e.get("request_id") == rid)
    answer: dict[str, Any] = events[-1]
    return answer


async def stored_rows(app: Cortex) -> tuple[int, int]:
    """Attachment rows and chunk rows in the app's database."""

    def count(session: Any) -> tuple[int, int]:
        files = session.scalar(select(func.count()).select_from(Attachment))
        chunks = session.scalar(select(func.count()).select_from(AttachmentChunk))
        return int(files or 0), int(chunks or 0)

    result: tuple[int, int] = await app.store.transact(count)
    return result
