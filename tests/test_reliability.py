"""Promises 1-3 of DESIGN.md: nothing lost, nothing doubled, the server survives everything."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from conftest import TIMEOUT, Client, deltas_text, eventually, final_message
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHeader

from cortex.server.handshakes import report_failure
from cortex.testing.fake_openai import FakeOpenAI, Reply

# Every test runs on the direct stream path and on LiteLLM's (conftest).
BOTH_LLM_PATHS = True

# The protocol promises hold on either store (docs/scaling.md).
BOTH_BACKENDS = True

LONG = " ".join(f"word{i}" for i in range(60))


async def _start_reply(client: Client, content: str = "go") -> str:
    await client.send(type="send", content=content)
    conversation_id: str = (await client.until_type("ack"))[-1]["conversation_id"]
    return conversation_id


async def _messages(app: Any, conversation_id: str) -> list[Any]:
    rows, _ = await app.store.messages(conversation_id, limit=200)
    return rows


async def test_resume_mid_reply_has_no_gap_and_no_repeat(
    connect_client: Any, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text=LONG, chunk_delay=0.02))
    first: Client = await connect_client()
    conversation_id = await _start_reply(first)
    await first.until(lambda e: e["type"] == "delta" and e["offset"] > 40)
    await first.ws.close()  # the client drops mid-reply ...
    late: Client = await connect_client()
    await late.send(
        type="subscribe", conversation_id=conversation_id, after_seq=1, request_id="resume"
    )
    events = await late.until_reply()
    kinds = [e["type"] for e in events]
    # Catch-up: the streaming row, typing on, the text so far; the ack marks where live begins.
    assert kinds[:4] == ["message", "typing", "delta", "ack"]
    assert events[1]["active"] is True and events[3]["request_id"] == "resume"
    # ... and a new connection gets the streaming row, the text so far at offset 0, then live.
    assert events[0]["type"] == "message" and events[0]["message"]["status"] == "streaming"
    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas[0]["offset"] == 0 and len(deltas[0]["text"]) > 40
    assert deltas_text(events) == LONG
    assert final_message(events)["content"] == LONG


async def test_reply_completes_after_every_client_left(
    client: Client, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text=LONG, chunk_delay=0.01))
    conversation_id = await _start_reply(client)
    await client.until_type("delta")
    await client.ws.close()
    async with asyncio.timeout(TIMEOUT):
        while True:
            rows = await _messages(server, conversation_id)
            if rows[-1].status != "streaming":
                break
            await asyncio.sleep(0.05)
    assert rows[-1].status == "complete" and rows[-1].content == LONG


async def test_same_client_msg_id_stores_one_message_and_one_reply(
    client: Client, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text="only once", chunk_delay=0.02))
    await client.send(type="send", content="hello", client_msg_id="m-1")
    ack1 = (await client.until_type("ack"))[-1]
    await client.send(type="send", content="hello", client_msg_id="m-1")
    ack2 = (await client.until_type("ack"))[-1]
    assert (ack1["message_id"], ack1["seq"], ack1["conversation_id"]) == (
        ack2["message_id"],
        ack2["seq"],
        ack2["conversation_id"],
    )
    await client.until_reply()
    cid = ack1["conversation_id"]
    await client.send(type="send", conversation_id=cid, content="hello", client_msg_id="m-1")
    ack3 = (await client.until_type("ack"))[-1]
    assert ack3["message_id"] == ack1["message_id"]
    rows = await _messages(server, cid)
    assert [(r.role, r.content) for r in rows] == [("user", "hello"), ("assistant", "only once")]
    assert len(provider.requests) == 1


async def test_conversations_reply_concurrently(connect_client: Any, provider: FakeOpenAI) -> None:
    provider.default = Reply(text="a b c d e f g h", chunk_delay=0.05)
    a: Client = await connect_client()
    b: Client = await connect_client()
    await _start_reply(a)
    await _start_reply(b)
    await a.until_type("delta")
    await b.until_type("delta")
    assert provider.active_requests == 2  # both streams are open at once
    await a.until_reply()
    await b.until_reply()


async def test_cancel_stores_partial_text_and_closes_the_stream(
    client: Client, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text=LONG, chunk_delay=0.05), Reply(text="next one"))
    conversation_id = await _start_reply(client)
    await client.until(lambda e: e["type"] == "delta" and e["offset"] > 10)
    await client.send(type="cancel", conversation_id=conversation_id)
    events = await client.until_reply()
    final = final_message(events)
    assert final["status"] == "cancelled"
    assert 10 < len(final["content"]) < len(LONG) and LONG.startswith(final["content"])
    await eventually(lambda: provider.active_requests == 0)
    rows = await _messages(server, conversation_id)
    assert rows[-1].status == "cancelled" and rows[-1].content == final["content"]
    # The conversation goes on after a cancel.
    await client.send(type="send", conversation_id=conversation_id, content="again")
    assert final_message(await client.until_reply())["content"] == "next one"


async def test_retries_429_then_succeeds(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(num_retries=2)
    provider.enqueue(Reply(status=429), Reply(status=503), Reply(text="third time lucky"))
    client: Client = await connect_to(app)
    await _start_reply(client)
    events = await client.until_reply(timeout=TIMEOUT * 3)
    assert final_message(events)["content"] == "third time lucky"
    assert not [e for e in events if e["type"] == "error"]
    assert len(provider.requests) == 3


async def test_fallback_model_answers_when_the_model_fails(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(fallback_models=["openai/backup-model"])
    provider.responder = lambda body: (
        Reply(status=500) if body["model"] == "fake-model" else Reply(text="from the backup")
    )
    client: Client = await connect_to(app)
    await _start_reply(client)
    events = await client.until_reply(timeout=TIMEOUT * 3)
    assert final_message(events)["content"] == "from the backup"
    assert [r["model"] for r in provider.requests][-1] == "backup-model"


async def test_stall_between_chunks_times_out(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(stream_idle_timeout=0.3)
    provider.enqueue(Reply(text=LONG, stall_after=5))
    client: Client = await connect_to(app)
    conversation_id = await _start_reply(client)
    events = await client.until_reply()
    assert [e["code"] for e in events if e["type"] == "error"] == ["provider_timeout"]
    final = final_message(events)
    assert final["status"] == "error" and final["error_code"] == "provider_timeout"
    assert final["content"] == deltas_text(events) and final["content"]
    rows = await _messages(app, conversation_id)
    assert rows[-1].content == final["content"]


async def test_cut_mid_stream_stores_partial_text(
    client: Client, provider: FakeOpenAI, server: Any
) -> None:
    provider.enqueue(Reply(text=LONG, cut_after=7))
    conversation_id = await _start_reply(client)
    events = await client.until_reply()
    errors = [e for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["provider_error"]
    final = final_message(events)
    assert final["status"] == "error" and final["error_code"] == "provider_error"
    assert final["content"] == deltas_text(events) and LONG.startswith(final["content"])
    rows = await _messages(server, conversation_id)
    assert rows[0].content == "go" and rows[-1].status == "error"


async def test_graceful_shutdown_interrupts_long_replies_and_closes_1001(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(shutdown_grace_s=0.3)
    provider.enqueue(Reply(text=LONG * 10, chunk_delay=0.02))
    client: Client = await connect_to(app)
    conversation_id = await _start_reply(client)
    await client.until_type("delta")
    await app.stop()
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv()
    assert client.ws.close_code == 1001
    from cortex.store import Store, make_engine

    engine = make_engine(app.settings)
    try:
        store = Store(engine)
        rows, _ = await store.messages(conversation_id)
        await store.close()
    finally:
        await engine.dispose()
    assert rows[-1].status == "interrupted" and rows[-1].content
    assert rows[0].content == "go"


async def test_flood_gets_rate_limited_then_closed(start_server: Any, connect_to: Any) -> None:
    app = await start_server(rate_per_s=1, rate_burst=5, rate_strikes=10)
    flooder: Client = await connect_to(app)
    bystander: Client = await connect_to(app)
    for _ in range(30):
        try:
            await flooder.ws.send(json.dumps({"type": "ping"}))
        except ConnectionClosed:
            break
    codes: list[str] = []
    with pytest.raises(ConnectionClosed):
        while True:
            event = await flooder.recv()
            if event["type"] == "error":
                codes.append(event["code"])
    assert codes and set(codes) == {"rate_limited"}
    assert flooder.ws.close_code == 1008
    assert (await bystander.request(type="ping"))["type"] == "pong"


async def test_connection_limit_closes_with_1013(start_server: Any, connect_to: Any) -> None:
    app = await start_server(max_connections=2)
    first: Client = await connect_to(app)
    await connect_to(app)
    assert (await first.request(type="ping"))["type"] == "pong"
    third: Client = await connect_to(app)
    with pytest.raises(ConnectionClosed):
        await third.recv()
    assert third.ws.close_code == 1013


# What a client may do to the opening handshake: what it writes, the start of the answer it
# gets before the server closes, and the line Cortex logs.
BROKEN_HANDSHAKES = [
    pytest.param(b"", b"", "handshake abandoned", id="TCP health check: connect, leave"),
    pytest.param(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"", "handshake abandoned", id="cut off"
    ),
    pytest.param(b"HELLO\r\n\r\n", b"", "handshake refused", id="not HTTP"),
    pytest.param(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"HTTP/1.1 400 ",
        "handshake refused",
        id="upgrade without its key",
    ),
]


async def _raw_handshake(port: int, data: bytes) -> bytes:
    """Write `data` on a bare TCP connection and read until the server closes. A client that
    has not sent a whole request stops writing, which is how leaving looks to the server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if not data.endswith(b"\r\n\r\n"):
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


@pytest.mark.parametrize(("data", "answer", "logged"), BROKEN_HANDSHAKES)
async def test_a_handshake_the_client_broke_is_not_a_server_error(
    server: Any,
    client: Client,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    answer: bytes,
    logged: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    got = await _raw_handshake(server.port, data)
    assert got.startswith(answer) and bool(got) == bool(answer), got
    await eventually(lambda: any(r.getMessage() == logged for r in caplog.records))
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [(r.name, r.getMessage()) for r in errors]
    # The server and the connection already open go on.
    assert (await client.request(type="ping"))["type"] == "pong"


def test_a_client_leaving_mid_answer_is_abandoned_and_a_bad_request_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that leaves while its answer is sent is the client's doing (the raw cases above
    cannot time that); a request websockets refused is one INFO line with its reason."""
    caplog.set_level(logging.DEBUG)
    report_failure(ConnectionClosedError(None, None))
    refused = InvalidHeader("Sec-WebSocket-Key")
    report_failure(refused)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("cortex.http", logging.DEBUG, "handshake abandoned"),
        ("cortex.http", logging.INFO, "handshake refused"),
    ]


async def test_slow_reader_is_dropped_and_others_go_on(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(send_buffer_bytes=65_536, rate_burst=1000, rate_per_s=1000)
    writer: Client = await connect_to(app)
    provider.default = Reply(text="ok")
    conversation_id = await _start_reply(writer, "x" * 30_000)
    await writer.until_reply()
    # A client that asks for a lot and never reads (its socket buffers fill up).
    before = set(app.connections)
    slow: Client = await connect_to(app, max_queue=1)
    (server_side,) = set(app.connections) - before
    frame = json.dumps({"type": "history", "conversation_id": conversation_id})
    for _ in range(600):
        await slow.ws.send(frame)
    await eventually(lambda: server_side not in app.connections, TIMEOUT * 2)
    close_frame = server_side.ws.protocol.close_sent
    assert close_frame is not None and close_frame.code == 1013
    # The server gave up on the slow client; the writer is still served.
    assert (await writer.request(type="ping"))["type"] == "pong"


async def test_messages_waiting_at_shutdown_are_answered_by_the_next_start(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text=LONG * 10, chunk_delay=0.02), Reply(text="answered after restart"))
    app = await start_server(shutdown_grace_s=0.2)
    client: Client = await connect_to(app)
    conversation_id = await _start_reply(client)
    await client.until_type("delta")
    queued = await client.request(
        type="send", conversation_id=conversation_id, content="and this one?"
    )
    assert queued["type"] == "ack" and queued["seq"] == 3
    await app.stop()  # the reply in progress is interrupted; the queued message stays stored
    # The reply queue is in the database: the next server answers what was acknowledged.
    again = await start_server(shutdown_grace_s=0.2)
    watcher: Client = await connect_to(again)
    await watcher.request(type="subscribe", conversation_id=conversation_id, after_seq=0)

    def complete(e: dict[str, Any]) -> bool:
        message = e.get("message") or {}
        return bool(e["type"] == "message" and message.get("status") == "complete")

    # The reply may end before the subscribe's ack, in its catch-up: look there first.
    if not any(complete(e) and e["message"]["role"] == "assistant" for e in watcher.seen):
        await watcher.until(lambda e: complete(e) and e["message"]["role"] == "assistant")
    final = [e for e in watcher.seen if complete(e) and e["message"]["role"] == "assistant"][-1][
        "message"
    ]
    assert (final["seq"], final["content"]) == (4, "answered after restart")
    page = await watcher.request(type="history", conversation_id=conversation_id)
    assert [(m["seq"], m["role"], m["status"]) for m in page["messages"]] == [
        (1, "user", "complete"),
        (2, "assistant", "interrupted"),
        (3, "user", "complete"),
        (4, "assistant", "complete"),
    ]
