"""Races the soak benchmark found: every one ends with a final `message` and nothing doubled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import Client, deltas_text, final_message

from cortex.store.repo import Store
from cortex.testing.fake_openai import FakeOpenAI, Reply

# The protocol promises hold on either store (docs/scaling.md).
BOTH_BACKENDS = True

TEXT = "one two three four five"


async def test_same_new_conversation_send_on_two_connections_is_stored_once(
    connect_client: Any, provider: FakeOpenAI, server: Any
) -> None:
    provider.default = Reply(text="answer")
    a: Client = await connect_client()
    b: Client = await connect_client()
    frame = {"type": "send", "content": "hello", "client_msg_id": "twice"}
    await asyncio.gather(a.send(**frame), b.send(**frame))
    ack_a = (await a.until_type("ack"))[-1]
    ack_b = (await b.until_type("ack"))[-1]
    assert (ack_a["conversation_id"], ack_a["message_id"]) == (
        ack_b["conversation_id"],
        ack_b["message_id"],
    )
    await a.until_reply()
    conversations, _ = await server.store.conversations(owner="local")
    assert len(conversations) == 1
    rows, _ = await server.store.messages(conversations[0].id)
    assert [r.role for r in rows] == ["user", "assistant"]


async def test_cancel_while_the_reply_is_being_stored_still_sends_the_final_message(
    client: Client, provider: FakeOpenAI, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Store.finish_message

    async def slow_final(self: Store, message_id: str, **fields: Any) -> Any:
        await asyncio.sleep(0.3)  # a final write that takes a while, as under load
        return await original(self, message_id, **fields)

    monkeypatch.setattr(Store, "finish_message", slow_final)
    provider.enqueue(Reply(text=TEXT))
    await client.send(type="send", content="hi")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until(lambda e: e["type"] == "delta" and deltas_text(client.seen) == TEXT)
    await client.send(type="cancel", conversation_id=conversation_id)
    events = await client.until_reply()
    # The cancel may still catch the end of the provider stream (its usage chunk) or land after
    # it: either way the reply ends with its final message, stored as the client is told.
    final = final_message(events)
    assert final["content"] == TEXT and final["status"] in ("complete", "cancelled")
    rows, _ = await server.store.messages(conversation_id)
    assert (rows[-1].status, rows[-1].content) == (final["status"], TEXT)


async def test_cancel_right_after_send_ends_the_reply_as_cancelled(
    client: Client, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text=TEXT, chunk_delay=0.05), Reply(text="next"))
    await client.send(type="send", content="hi", client_msg_id="x1")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.send(type="cancel", conversation_id=conversation_id)
    events = await client.until_reply()
    assert final_message(events)["status"] == "cancelled"
    rows, _ = await server.store.messages(conversation_id)
    assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "cancelled")]
    await client.send(type="send", conversation_id=conversation_id, content="again")
    assert final_message(await client.until_reply())["status"] == "complete"


async def test_shutdown_refuses_new_sends_and_leaves_nothing_streaming(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(shutdown_grace_s=0.5)
    provider.default = Reply(text=TEXT * 40, chunk_delay=0.02)
    first: Client = await connect_to(app)
    late: Client = await connect_to(app)
    await first.send(type="send", content="long one")
    conversation_id = (await first.until_type("ack"))[-1]["conversation_id"]
    await first.send(type="send", conversation_id=conversation_id, content="queued behind")
    await first.until_type("delta")
    stopping = asyncio.create_task(app.stop())
    await asyncio.sleep(0.1)  # the drain has begun
    error = await late.request(type="send", content="too late")
    assert error["type"] == "error" and error["code"] == "unavailable"
    await stopping
    from cortex.store import Store as FreshStore
    from cortex.store import make_engine

    engine = make_engine(app.settings)
    try:
        store = FreshStore(engine)
        conversations, _ = await store.conversations(owner="local")
        statuses = [r.status for c in conversations for r in (await store.messages(c.id))[0]]
    finally:
        await store.close()
        await engine.dispose()
    assert "streaming" not in statuses and "interrupted" in statuses
    assert len(conversations) == 1  # the refused send stored nothing


async def test_a_send_stored_while_the_server_begins_closing_is_seen_through(
    start_server: Any, connect_to: Any, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send whose transaction is in flight when the drain begins was accepted: the drain waits
    for the send and then for its reply (the soak found rows left `streaming` when it did not)."""
    app = await start_server(shutdown_grace_s=5)
    provider.default = Reply(text=TEXT, chunk_delay=0.01)
    original = Store.add_user_message
    gate = asyncio.Event()
    reached = asyncio.Event()

    async def slow_store(self: Store, **kwargs: Any) -> Any:
        reached.set()
        await gate.wait()  # the transaction is under way when the drain begins
        return await original(self, **kwargs)

    monkeypatch.setattr(Store, "add_user_message", slow_store)
    client: Client = await connect_to(app)
    await client.send(type="send", content="just in time")
    await asyncio.wait_for(reached.wait(), 10)
    stopping = asyncio.create_task(app.stop())
    for _ in range(1000):  # stop() runs up to the drain, which waits for the send
        if app.router.closing:
            break
        await asyncio.sleep(0.01)
    assert app.router.closing and not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 30)
    from cortex.store import Store as FreshStore
    from cortex.store import make_engine

    engine = make_engine(app.settings)
    try:
        store = FreshStore(engine)
        conversations, _ = await store.conversations(owner="local")
        rows = [r for c in conversations for r in (await store.messages(c.id))[0]]
    finally:
        await store.close()
        await engine.dispose()
    assert [(r.role, r.status) for r in rows] == [("user", "complete"), ("assistant", "complete")]
    assert rows[1].content == TEXT


async def test_a_burst_of_chunks_is_still_streamed(client: Client, provider: FakeOpenAI) -> None:
    words = " ".join(f"w{i}" for i in range(2000))
    provider.enqueue(Reply(text=words))  # no delay: the provider sends everything at once
    await client.send(type="send", content="burst")
    events = await client.until_reply()
    assert deltas_text(events) == words
    assert sum(e["type"] == "delta" for e in events) > 1  # not held back until the end
