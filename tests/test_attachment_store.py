"""The attachment tables on SQLite and PostgreSQL: chunks, per-user dedup, links, clean-up."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from conftest import make_settings
from sqlalchemy import func, select, update

from cortex.store import Store
from cortex.store.attachments import CHUNK_BYTES, AttachmentStore
from cortex.store.models import Attachment, AttachmentChunk, utcnow

BOTH_BACKENDS = True


async def _upload(files: AttachmentStore, owner: str, data: bytes, name: str = "f.txt") -> str:
    pending = await files.create(owner=owner, filename=name, size=len(data))
    for n, start in enumerate(range(0, len(data), CHUNK_BYTES)):
        await files.add_chunk(pending, n, data[start : start + CHUNK_BYTES])
    import hashlib

    row = await files.finish(
        pending, owner=owner, sha256=hashlib.sha256(data).hexdigest(), kind="text"
    )
    return row.id


async def _count(store: Store, model: type[Attachment] | type[AttachmentChunk]) -> int:
    count = await store.transact(lambda s: s.scalar(select(func.count()).select_from(model)))
    return int(count or 0)


async def test_bytes_come_back_in_chunks(store: Store) -> None:
    files = AttachmentStore(store)
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 7)  # two chunks and a bit
    attachment_id = await _upload(files, "u", data)
    assert await files.read(attachment_id) == data
    assert len([c async for c in files.chunks(attachment_id)]) == 3


async def test_one_user_stores_a_file_once_two_users_twice(store: Store) -> None:
    files = AttachmentStore(store)
    first = await _upload(files, "alice", b"same bytes", "a.txt")
    again = await _upload(files, "alice", b"same bytes", "b.txt")
    other = await _upload(files, "bob", b"same bytes", "a.txt")
    assert again == first
    assert other != first
    assert await _count(store, Attachment) == 2
    assert await _count(store, AttachmentChunk) == 2
    assert await files.get(first, owner="bob") is None  # nobody probes another's ids
    assert await files.owned([first], owner="bob") is None
    assert await files.used_bytes("alice") == len(b"same bytes")


async def test_the_sweep_removes_unreferenced_old_uploads_only(store: Store) -> None:
    files = AttachmentStore(store)
    old = await _upload(files, "u", b"old")
    kept = await _upload(files, "u", b"new")
    used = await _upload(files, "u", b"used")
    stored = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id=None, attachment_ids=[used]
    )
    assert stored is not None
    past = utcnow() - timedelta(hours=2)
    await store.transact(
        lambda s: s.execute(
            update(Attachment).where(Attachment.id.in_([old, used])).values(created_at=past)
        )
    )
    assert await files.sweep(3600) == 1
    assert await files.get(old, owner="u") is None
    assert await files.get(kept, owner="u") is not None
    assert await files.get(used, owner="u") is not None
    # deleting the conversation deletes what only it used
    assert await store.delete_conversation(stored.conversation.id, owner="u") == 1
    assert await files.get(used, owner="u") is None
    assert await _count(store, Attachment) == 1


async def test_an_attachment_two_conversations_share_stays_until_both_go(store: Store) -> None:
    files = AttachmentStore(store)
    shared = await _upload(files, "u", b"shared")
    convs = []
    for _ in range(2):
        stored = await store.add_user_message(
            owner="u",
            conversation_id=None,
            content="x",
            client_msg_id=None,
            attachment_ids=[shared],
        )
        assert stored is not None
        convs.append(stored.conversation.id)
    views = await files.of_messages([])
    assert views == {}
    await store.delete_conversation(convs[0], owner="u")
    assert await files.get(shared, owner="u") is not None
    await store.delete_conversation(convs[1], owner="u")
    assert await files.get(shared, owner="u") is None
    assert await _count(store, AttachmentChunk) == 0


async def test_an_upload_holds_less_than_a_chunk_whatever_its_frames(
    store: Store, tmp_path: Path
) -> None:
    """A frame may be larger than a chunk: every whole chunk is stored at once (bench/
    attachments.py found a buffer that grew with the file when only one was)."""
    from cortex.pipeline.files import Files

    files = Files(settings=make_settings(tmp_path), store=store)
    upload = await files.begin("u", filename="big.txt", size=4 * 1_048_576)
    for _ in range(4):
        await upload.write(b"x" * 1_048_576)
        assert len(upload._buffer) < CHUNK_BYTES
    view = await upload.finish()
    assert view.size == 4 * 1_048_576
    assert len([c async for c in files.store.chunks(view.id)]) == 16


async def test_the_same_bytes_finishing_at_once_are_stored_once(store: Store) -> None:
    import hashlib

    files = AttachmentStore(store)
    data = b"raced bytes"
    pending = []
    for _ in range(4):
        attachment_id = await files.create(owner="u", filename="r.txt", size=len(data))
        await files.add_chunk(attachment_id, 0, data)
        pending.append(attachment_id)
    sha = hashlib.sha256(data).hexdigest()
    rows = await asyncio.gather(
        *(files.finish(p, owner="u", sha256=sha, kind="text") for p in pending)
    )
    assert len({row.id for row in rows}) == 1
    assert await _count(store, Attachment) == 1
    assert await _count(store, AttachmentChunk) == 1
