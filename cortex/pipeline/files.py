"""Attachments on their way in and out: an upload checked as its bytes arrive and stored in
chunks, the ids a `send` carries, and what the model and clients are shown of them.

The checks themselves are pure and live in `cortex.attachments`; the rows in
`cortex.store.attachments`. See docs/attachments.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..attachments import image, pdf
from ..attachments.parts import ModelAttachment
from ..attachments.sniff import SNIFF_BYTES, Sniffed, sniff
from ..attachments.text import TextDecoder
from ..config import Settings
from ..errors import BadAttachment, BadFrame, NotFound, QuotaExceeded, TooLarge
from ..protocol import AttachmentView
from ..store.attachments import CHUNK_BYTES, AttachmentStore
from ..store.models import Attachment

if TYPE_CHECKING:
    from ..store.repo import Store

log = logging.getLogger("cortex.attachments")

# The images a model is sent, scaled, kept by attachment id (its bytes never change): a
# conversation sends its images again at every turn, and scaling one takes up to a second.
SCALED_CACHE_BYTES = 64 * 1024 * 1024


class ScaledImages:
    """A least-recently-used cache of model-ready images, bounded by their bytes."""

    def __init__(self, budget: int = SCALED_CACHE_BYTES) -> None:
        self.budget = budget
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0

    def get(self, attachment_id: str) -> tuple[str, bytes] | None:
        found = self._items.get(attachment_id)
        if found is not None:
            self._items.move_to_end(attachment_id)
        return found

    def put(self, attachment_id: str, item: tuple[str, bytes]) -> None:
        if len(item[1]) > self.budget or attachment_id in self._items:
            return
        self._items[attachment_id] = item
        self._bytes += len(item[1])
        while self._bytes > self.budget:
            _, (_, data) = self._items.popitem(last=False)
            self._bytes -= len(data)


def attachment_view(row: Attachment) -> AttachmentView:
    return AttachmentView.model_construct(
        id=row.id,
        filename=row.filename,
        content_type=row.content_type,
        size=row.size,
        kind=row.kind,
        width=row.width,
        height=row.height,
        pages=row.pages,
    )


class Upload:
    """One file arriving: hashed, checked and stored a chunk at a time (memory: one chunk)."""

    def __init__(self, files: Files, owner: str, attachment_id: str, size: int) -> None:
        self.files = files
        self.owner = owner
        self.id = attachment_id
        self.size = size
        self.received = 0
        self._buffer = bytearray()
        self._chunks = 0
        self._sha = hashlib.sha256()
        self._sniffed: Sniffed | None = None
        self._image: image.ImageInfo | None = None
        self._text: TextDecoder | None = None

    @property
    def complete(self) -> bool:
        return self.received >= self.size

    async def write(self, data: bytes) -> None:
        """Take the next bytes; a check that fails raises at once (the caller discards)."""
        if self.received + len(data) > self.size:
            raise BadAttachment(
                f"more bytes than announced: {self.received + len(data)} of {self.size}"
            )
        self.received += len(data)
        self._sha.update(data)
        self._buffer += data
        while len(self._buffer) >= CHUNK_BYTES:  # a frame may hold several chunks
            await self._flush()

    async def _flush(self) -> None:
        data = bytes(self._buffer[:CHUNK_BYTES])
        del self._buffer[:CHUNK_BYTES]
        if self._sniffed is None:
            self._check_head(data)
        if self._text is not None:
            self._text.feed(data)
        await self.files.store.add_chunk(self.id, self._chunks, data)
        self._chunks += 1

    def _check_head(self, head: bytes) -> None:
        """The type, from the first chunk (and an image's header, before any pixel)."""
        self._sniffed = sniff(head[:SNIFF_BYTES])
        if self._sniffed.kind == "image":
            self._image = image.inspect(head)
        elif self._sniffed.kind == "text":
            self._text = TextDecoder()

    async def finish(self) -> AttachmentView:
        """The last checks; the stored attachment (an earlier copy of the same bytes, if the
        owner has one)."""
        while self._buffer:
            await self._flush()
        assert self._sniffed is not None
        fields: dict[str, object] = {
            "kind": self._sniffed.kind,
            "content_type": self._sniffed.content_type,
        }
        if self._image is not None:
            fields.update(
                width=self._image.width,
                height=self._image.height,
                content_type=self._image.content_type,
            )
        elif self._text is not None:
            self._text.feed(b"", final=True)
            fields["text"] = self._text.text()
        else:
            found = await pdf.extract(self.files.store.chunks(self.id))
            fields.update(pages=found.pages, text=found.text)
        row = await self.files.store.finish(
            self.id, owner=self.owner, sha256=self._sha.hexdigest(), **fields
        )
        if row.kind == "image":
            self.files.prepare(row)  # scaled while the user writes, not when they send
        return attachment_view(row)

    async def discard(self) -> None:
        await self.files.store.discard(self.id)


class Files:
    """Uploads, the checks of a `send`'s attachment ids, and the model's view of them."""

    def __init__(self, *, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = AttachmentStore(store)
        self.scaled = ScaledImages()
        self._preparing: set[asyncio.Task[None]] = set()

    def prepare(self, row: Attachment) -> None:
        """Scale a new image for the model in the background (a send then finds it ready)."""
        task = asyncio.create_task(self._prepare(row))
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def _prepare(self, row: Attachment) -> None:
        try:
            await self._scaled_image(row)
        except Exception:  # the send scales it again, and reports what fails there
            log.warning("could not prepare image %s for the model", row.id, exc_info=True)

    async def _scaled_image(self, row: Attachment) -> tuple[str, bytes]:
        found = self.scaled.get(row.id)
        if found is None:
            raw = await self.store.read(row.id)
            found = await asyncio.to_thread(image.for_model, raw, row.content_type)
            self.scaled.put(row.id, found)
        return found

    async def begin(self, owner: str, *, filename: str, size: int) -> Upload:
        """Open an upload, or refuse it before any byte is held: too large, over the quota."""
        s = self.settings
        if size > s.max_attachment_bytes:
            raise TooLarge(
                f"the file is {size:,} bytes; at most {s.max_attachment_bytes:,} are accepted"
            )
        used = await self.store.used_bytes(owner)
        if used + size > s.attachment_quota_bytes:
            raise QuotaExceeded(
                f"attachments would take {used + size:,} bytes of your "
                f"{s.attachment_quota_bytes:,}; delete conversations to free space"
            )
        attachment_id = await self.store.create(owner=owner, filename=_clean(filename), size=size)
        return Upload(self, owner, attachment_id, size)

    async def for_send(self, owner: str, ids: Sequence[str]) -> list[Attachment]:
        """The attachments a `send` names: all the owner's and ready, or `not_found`."""
        if len(ids) > self.settings.max_attachments:
            raise BadFrame(f"at most {self.settings.max_attachments} attachments a message")
        if len(set(ids)) != len(ids):
            raise BadFrame("an attachment is named twice")
        rows = await self.store.owned(ids, owner=owner)
        if rows is None:
            raise NotFound("no such attachment")
        return rows

    async def get(self, owner: str, attachment_id: str) -> Attachment:
        row = await self.store.get(attachment_id, owner=owner)
        if row is None:
            raise NotFound("no such attachment")
        return row

    async def views(self, message_ids: Sequence[str]) -> dict[str, list[AttachmentView]]:
        found = await self.store.of_messages(message_ids)
        return {mid: [attachment_view(row) for row in rows] for mid, rows in found.items()}

    async def for_model(self, message_ids: Sequence[str]) -> dict[str, list[ModelAttachment]]:
        """Each message's attachments as the model gets them: images with their bytes, scaled
        to the providers' limit in threads side by side (Pillow lets go of the GIL)."""
        found = await self.store.of_messages(message_ids)
        out: dict[str, list[ModelAttachment]] = {}
        for message_id, rows in found.items():
            out[message_id] = await asyncio.gather(*(self._for_model(row) for row in rows))
        return out

    async def _for_model(self, row: Attachment) -> ModelAttachment:
        content_type, data = row.content_type, None
        if row.kind == "image":
            content_type, data = await self._scaled_image(row)
        return ModelAttachment(
            filename=row.filename,
            kind=row.kind or "text",
            content_type=content_type,
            width=row.width,
            height=row.height,
            pages=row.pages,
            text=row.text,
            data=data,
        )

    async def sweep(self) -> int:
        return await self.store.sweep(self.settings.attachment_ttl_s)


def _clean(filename: str) -> str:
    """The name's last path part, without control characters (it is shown and sent on)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:255] or "file"
