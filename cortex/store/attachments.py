"""Attachments in the database: rows, chunked bytes, the message links, and their clean-up.

The bytes are in `attachment_chunks` rows of `CHUNK_BYTES` on SQLite and PostgreSQL alike: one
code path, readable by every process, and no statement ever carries a whole file. Each method is
one short transaction through the `Store`'s runner.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, bindparam, delete, exists, func, select, update
from sqlalchemy.orm import Session

from .models import Attachment, AttachmentChunk, Message, MessageAttachment, utcnow
from .statements import StoreConflict, core

CHUNK_BYTES = 256 * 1024
_LINKS = (
    select(MessageAttachment.message_id, MessageAttachment.attachment_id)
    .where(MessageAttachment.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(MessageAttachment.message_id, MessageAttachment.position)
)
T = TypeVar("T")


class Runner(Protocol):
    """What runs a transaction: the `Store`."""

    async def transact(self, fn: Callable[[Session], T]) -> T: ...


class AttachmentStore:
    """The attachment tables, over the `Store`'s transactions."""

    def __init__(self, store: Runner) -> None:
        self._run = store.transact

    async def create(self, *, owner: str, filename: str, size: int) -> str:
        """A pending attachment, to which chunks are added as they arrive."""
        row = Attachment(owner=owner, filename=filename, size=size, status="pending")

        def add(session: Session) -> str:
            session.add(row)
            session.flush()
            return row.id

        return await self._run(add)

    async def add_chunk(self, attachment_id: str, n: int, data: bytes) -> None:
        await self._run(
            lambda session: session.add(
                AttachmentChunk(attachment_id=attachment_id, n=n, data=data)
            )
        )

    async def chunks(self, attachment_id: str) -> AsyncIterator[bytes]:
        """The bytes, one chunk per transaction: memory holds one chunk at a time."""
        n = 0
        while True:
            query = select(AttachmentChunk.data).where(
                AttachmentChunk.attachment_id == attachment_id, AttachmentChunk.n == n
            )
            data = await self._run(lambda session, q=query: session.scalar(q))  # type: ignore[misc]
            if data is None:
                return
            yield bytes(data)
            n += 1

    async def read(self, attachment_id: str) -> bytes:
        return b"".join([chunk async for chunk in self.chunks(attachment_id)])

    async def finish(
        self, attachment_id: str, *, owner: str, sha256: str, **fields: object
    ) -> Attachment:
        """Mark an upload ready; if the owner already has these bytes, keep that one instead
        (this pending copy goes) and return it."""

        def settle(session: Session) -> Attachment:
            found = session.scalars(
                select(Attachment).where(
                    Attachment.owner == owner,
                    Attachment.sha256 == sha256,
                    Attachment.status == "ready",
                )
            ).first()
            if found is not None:
                _drop(session, [attachment_id])
                return found
            session.execute(
                update(Attachment)
                .where(Attachment.id == attachment_id)
                .values(sha256=sha256, status="ready", **fields)
            )
            row = session.get(Attachment, attachment_id, populate_existing=True)
            assert row is not None
            return row

        try:
            return await self._run(settle)
        except StoreConflict:
            # The same bytes finished at the same moment on another connection (the unique
            # index said so): this time the other copy is found, and this one goes.
            return await self._run(settle)

    async def discard(self, attachment_id: str) -> None:
        await self._run(lambda session: _drop(session, [attachment_id]))

    async def used_bytes(self, owner: str) -> int:
        query = select(func.coalesce(func.sum(Attachment.size), 0)).where(Attachment.owner == owner)
        used = await self._run(lambda session: session.scalar(query))
        return int(used or 0)

    async def get(self, attachment_id: str, *, owner: str) -> Attachment | None:
        """The owner's ready attachment; None for anyone else's (no probing)."""
        row = await self._run(lambda session: session.get(Attachment, attachment_id))
        if row is None or row.owner != owner or row.status != "ready":
            return None
        return row

    async def owned(self, ids: Sequence[str], *, owner: str) -> list[Attachment] | None:
        """The owner's ready attachments in the order of `ids`; None if one is not theirs."""
        query = select(Attachment).where(
            Attachment.id.in_(list(ids)), Attachment.owner == owner, Attachment.status == "ready"
        )
        rows = {row.id: row for row in await self._run(lambda s: s.scalars(query).all())}
        return [rows[i] for i in ids] if all(i in rows for i in ids) else None

    async def of_messages(self, message_ids: Sequence[str]) -> dict[str, list[Attachment]]:
        """Each message's attachments, in order (messages with none are left out).

        On every reply's way (its context's user messages): a prebuilt Core statement finds the
        links, and rows are loaded only when there are some (0.74 ms a lookup before, on SQLite).
        """
        if not message_ids:
            return {}

        def read(session: Session) -> dict[str, list[Attachment]]:
            links = core(session).execute(_LINKS, {"ids": list(message_ids)}).all()
            if not links:
                return {}
            ids = {attachment_id for _, attachment_id in links}
            rows = {
                row.id: row
                for row in session.scalars(select(Attachment).where(Attachment.id.in_(ids)))
            }
            out: dict[str, list[Attachment]] = {}
            for message_id, attachment_id in links:
                if attachment_id in rows:
                    out.setdefault(message_id, []).append(rows[attachment_id])
            return out

        return await self._run(read)

    async def sweep(self, ttl_s: float) -> int:
        """Remove uploads no message refers to, older than `ttl_s` (pending ones left by a
        process that died included). How many went."""
        cutoff = utcnow() - timedelta(seconds=ttl_s)

        def sweep(session: Session) -> int:
            ids = list(
                session.scalars(
                    select(Attachment.id).where(
                        Attachment.created_at < cutoff,
                        ~exists().where(MessageAttachment.attachment_id == Attachment.id),
                    )
                ).all()
            )
            _drop(session, ids)
            return len(ids)

        return await self._run(sweep)


def link(session: Session, message_id: str, attachment_ids: Sequence[str]) -> None:
    """Tie a message to its attachments (in the transaction that stores the message)."""
    for position, attachment_id in enumerate(attachment_ids):
        session.add(
            MessageAttachment(message_id=message_id, attachment_id=attachment_id, position=position)
        )
    session.flush()


def unlink_conversation(session: Session, conversation_id: str) -> None:
    """Before a conversation's messages are deleted: drop their links, and the attachments
    that no other message uses."""
    unlink(session, select(Message.id).where(Message.conversation_id == conversation_id))


def unlink(session: Session, message_ids: Sequence[str] | Select[Any]) -> None:
    """Before messages are deleted (a conversation, a branch): drop their links, and the
    attachments that no other message uses."""
    used = list(
        session.scalars(
            select(MessageAttachment.attachment_id)
            .where(MessageAttachment.message_id.in_(message_ids))
            .distinct()
        ).all()
    )
    session.execute(delete(MessageAttachment).where(MessageAttachment.message_id.in_(message_ids)))
    if used:
        still = set(
            session.scalars(
                select(MessageAttachment.attachment_id).where(
                    MessageAttachment.attachment_id.in_(used)
                )
            ).all()
        )
        _drop(session, [i for i in used if i not in still])


def linked(session: Session, message_id: str) -> list[str]:
    """The attachment ids of a message, in its order (an edit keeps them; a fork shares them)."""
    return list(
        session.scalars(
            select(MessageAttachment.attachment_id)
            .where(MessageAttachment.message_id == message_id)
            .order_by(MessageAttachment.position)
        ).all()
    )


def _drop(session: Session, ids: Sequence[str]) -> None:
    """Delete attachments with their chunks (explicitly: SQLite enforces no cascade)."""
    if not ids:
        return
    session.execute(delete(AttachmentChunk).where(AttachmentChunk.attachment_id.in_(list(ids))))
    session.execute(delete(Attachment).where(Attachment.id.in_(list(ids))))
