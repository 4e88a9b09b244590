"""The core pipeline end to end: real server, real client, LiteLLM's HTTP path to a fake."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Client, deltas_text, final_message, make_settings

from cortex.app import Cortex, running
from cortex.testing.fake_openai import FakeOpenAI, Reply

# The protocol promises hold on either store (docs/scaling.md).
BOTH_BACKENDS = True


async def test_reply_streams_to_sender_and_is_stored(
    client: Client, provider: FakeOpenAI, http: Any
) -> None:
    # Chunks further apart than CORTEX_DELTA_INTERVAL_MS (50): a writer that keeps up sends
    # one delta per chunk (a lagging one merges them).
    provider.enqueue(
        Reply(text="The quick brown fox jumps over the lazy dog.", chunks=9, chunk_delay=0.06)
    )
    await client.send(type="send", content="Tell me about foxes", request_id="a1")
    ack = await client.until_type("ack")
    assert ack[-1]["request_id"] == "a1" and ack[-1]["seq"] == 1
    conversation_id = ack[-1]["conversation_id"]
    events = await client.until_reply()
    kinds = [e["type"] for e in events]
    assert kinds.index("typing") < kinds.index("delta")
    assert sum(1 for e in events if e["type"] == "delta") == 9
    text = deltas_text(events)
    assert text == "The quick brown fox jumps over the lazy dog."
    final = final_message(events)
    assert final["content"] == text and final["status"] == "complete"
    assert final["usage"]["completion_tokens"] == 9 and final["usage"]["prompt_tokens"] > 0
    status, page = await http(f"/api/conversations/{conversation_id}/messages")
    assert status == 200
    assert [(m["role"], m["content"]) for m in page["messages"]] == [
        ("user", "Tell me about foxes"),
        ("assistant", text),
    ]


async def test_chunks_closer_than_the_delta_interval_are_joined_at_exact_offsets(
    client: Client, provider: FakeOpenAI
) -> None:
    """20 chunks 5 ms apart: the first goes out at once, the rest at most every 50 ms
    (CORTEX_DELTA_INTERVAL_MS), joined, with offsets that still continue the text."""
    text = " ".join(f"w{i}" for i in range(20))
    provider.enqueue(Reply(text=text, chunks=20, chunk_delay=0.005))
    await client.send(type="send", content="go")
    events = await client.until_reply()
    deltas = [e for e in events if e["type"] == "delta"]
    assert 2 <= len(deltas) <= 6, [d["text"] for d in deltas]
    offset = 0
    for delta in deltas:
        assert delta["offset"] == offset
        offset += len(delta["text"])
    assert deltas_text(events) == text == final_message(events)["content"]


def _shape(events: list[dict[str, Any]]) -> list[str]:
    """The events as the protocol orders them, a run of deltas as one `delta`."""
    shape: list[str] = []
    for e in events:
        kind = e["type"]
        if kind == "message":
            kind = f"{e['message']['role']} {e['message']['status']}"
        elif kind == "typing":
            kind = f"typing {'on' if e['active'] else 'off'}"
        if not (kind == "delta" and shape and shape[-1] == "delta"):
            shape.append(kind)
    return shape


NEW_CONVERSATION_SHAPE = [
    "ack",
    "user complete",
    "typing on",
    "assistant streaming",
    "delta",
    "assistant complete",
    "typing off",
]


async def test_a_new_conversations_events_come_in_order(
    client: Client, provider: FakeOpenAI
) -> None:
    """A new conversation's reply is started before its first frames are written: they must
    still come ack first and deltas only after the row they stream into."""
    provider.enqueue(Reply(text="one two three four", chunks=4))
    await client.send(type="send", content="hello", client_msg_id="c1")
    assert _shape(await client.until_reply()) == NEW_CONVERSATION_SHAPE
    # A follow-up message takes the other way (its turn is read back): the same order.
    conversation_id = client.seen[0]["conversation_id"]
    provider.enqueue(Reply(text="five six", chunks=2))
    await client.send(type="send", content="more", conversation_id=conversation_id)
    assert _shape(await client.until_reply()) == NEW_CONVERSATION_SHAPE


async def test_two_clients_see_the_same_reply(connect_client: Any, provider: FakeOpenAI) -> None:
    provider.enqueue(Reply(text="first"), Reply(text="one two three four five six", chunks=6))
    alice: Client = await connect_client()
    bob: Client = await connect_client()
    await alice.send(type="send", content="hello")
    conversation_id = (await alice.until_type("ack"))[-1]["conversation_id"]
    await alice.until_reply()
    # The subscription is in place once its ack arrives.
    assert (await bob.request(type="subscribe", conversation_id=conversation_id))["type"] == "ack"
    await alice.send(type="send", conversation_id=conversation_id, content="again")
    seen_alice = await alice.until_reply()
    seen_bob = await bob.until_reply()

    def stream(events: list[dict[str, Any]]) -> list[Any]:
        """The events in order, with the deltas joined: a writer that lags may merge deltas,
        so both clients must see the same text at the same offsets, not the same frames."""
        out: list[Any] = []
        for e in events:
            if e["type"] == "delta":
                if out and out[-1][0] == "text":
                    out[-1] = ("text", out[-1][1] + e["text"])
                else:
                    out.append(("text", e["text"]))
            elif e["type"] in ("typing", "message"):
                out.append((e["type"], e.get("active"), e.get("seq")))
        return out

    assert stream(seen_alice) == stream(seen_bob)
    typing = [item for item in stream(seen_bob) if item[0] == "typing"]
    assert typing == [("typing", True, None), ("typing", False, None)]
    assert stream(seen_bob)[-1] == ("typing", False, None)
    assert deltas_text(seen_bob) == "one two three four five six"
    assert final_message(seen_bob) == final_message(seen_alice)
    user_events = [e for e in seen_bob if e["type"] == "message" and e["message"]["role"] == "user"]
    assert [e["message"]["content"] for e in user_events] == ["again"]


async def test_history_over_ws_and_http_with_pagination(
    client: Client, provider: FakeOpenAI, http: Any
) -> None:
    conversation_id = None
    for i in range(3):
        provider.enqueue(Reply(text=f"answer {i}"))
        frame: dict[str, Any] = {"type": "send", "content": f"question {i}"}
        if conversation_id:
            frame["conversation_id"] = conversation_id
        await client.send(**frame)
        conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
        await client.until_reply()
    page = await client.request(type="history", conversation_id=conversation_id, limit=4)
    assert page["type"] == "history" and page["has_more"] is True
    assert [m["seq"] for m in page["messages"]] == [3, 4, 5, 6]
    assert [m["content"] for m in page["messages"]] == [
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
    ]
    older = await client.request(
        type="history", conversation_id=conversation_id, before_seq=3, limit=4
    )
    assert [m["seq"] for m in older["messages"]] == [1, 2] and older["has_more"] is False
    status, body = await http(f"/api/conversations/{conversation_id}/messages?limit=4")
    assert status == 200 and [m["seq"] for m in body["messages"]] == [3, 4, 5, 6]
    assert body["has_more"] is True
    status, body = await http(f"/api/conversations/{conversation_id}/messages?before_seq=3")
    assert [m["content"] for m in body["messages"]] == ["question 0", "answer 0"]
    status, body = await http("/api/conversations")
    assert status == 200 and body["items"][0]["id"] == conversation_id
    assert body["items"][0]["title"] == "question 0"
    listing = await client.request(type="conversations")
    assert [c["id"] for c in listing["items"]] == [conversation_id]
    status, body = await http("/api/conversations/nope/messages")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await http("/api/conversations/x/messages?limit=abc")
    assert status == 400


async def test_second_message_sends_the_first_exchange(
    client: Client, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text="Paris is the capital."), Reply(text="About 2 million."))
    await client.send(type="send", content="Capital of France?")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    await client.send(type="send", conversation_id=conversation_id, content="Population?")
    await client.until_reply()
    sent = provider.requests[-1]["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "You are a helpful assistant."),
        ("user", "Capital of France?"),
        ("assistant", "Paris is the capital."),
        ("user", "Population?"),
    ]
    assert provider.requests[-1]["stream"] is True


async def test_provider_failure_gives_error_and_keeps_user_message(
    client: Client, provider: FakeOpenAI, http: Any
) -> None:
    provider.enqueue(Reply(status=500))
    await client.send(type="send", content="will this work?")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    events = await client.until_reply()
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["code"] == "provider_error"
    assert errors[0]["conversation_id"] == conversation_id
    assert final_message(events)["status"] == "error"
    _, body = await http(f"/api/conversations/{conversation_id}/messages")
    assert body["messages"][0]["content"] == "will this work?"
    assert body["messages"][1]["error_code"] == "provider_error"
    assert (await client.request(type="ping"))["type"] == "pong"


async def test_bad_frames_get_typed_errors_and_the_connection_survives(
    client: Client, server: Cortex
) -> None:
    cases: list[tuple[str | bytes, str]] = [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_frame"),
        ('{"no_type": 1}', "bad_frame"),
        ('{"type": "launch_rockets"}', "unknown_type"),
        ('{"type": "send"}', "bad_frame"),
        ('{"type": "send", "content": 5}', "bad_frame"),
        ('{"type": "send", "content": "   "}', "bad_frame"),
        ('{"type": "send", "content": "hi", "surprise": true}', "bad_frame"),
        ('{"type": "history", "conversation_id": "x", "limit": 100000}', "bad_frame"),
        ('{"type": "history", "conversation_id": "no-such-id"}', "not_found"),
        ('{"type": "subscribe", "conversation_id": "no-such-id"}', "not_found"),
        ('{"type": "send", "conversation_id": "no-such-id", "content": "hi"}', "not_found"),
        ('{"type": "send", "content": "hi", "model": "gpt-evil"}', "bad_frame"),
        (
            '{"type": "send", "content": "' + "x" * (server.settings.max_message_chars + 1) + '"}',
            "too_large",
        ),
        ('{"type": "ping", "request_id": "echo-me", "bogus": 1}', "bad_frame"),
        (b"\x00\x01binary", "bad_frame"),
        ("[" * 100_000 + "]" * 100_000, "bad_json"),
    ]
    for raw, code in cases:
        await client.ws.send(raw)
        error = (await client.until_type("error"))[-1]
        assert error["code"] == code, (raw[:60], error)
        assert error["message"]
        assert (await client.request(type="ping"))["type"] == "pong"
    assert error is not None
    await client.ws.send('{"type": "ping", "request_id": "echo-me", "bogus": 1}')
    assert (await client.until_type("error"))[-1]["request_id"] == "echo-me"


async def test_oversize_frame_closes_with_1009(connect_client: Any, server: Cortex) -> None:
    victim: Client = await connect_client()
    other: Client = await connect_client()
    await victim.ws.send("x" * (server.settings.max_frame_bytes + 10))
    await victim.ws.wait_closed()
    assert victim.ws.close_code == 1009
    assert (await other.request(type="ping"))["type"] == "pong"


async def test_mock_model_needs_no_network(tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    settings = make_settings(tmp_path, None, llm_api_base="http://127.0.0.1:9/unreachable")
    assert settings.model({}) == "mock"
    async with running(settings) as app, connect(app.url) as ws:
        client = Client(ws)
        await client.send(type="send", content="hello mock")
        events = await client.until_reply()
        final = final_message(events)
        assert final["status"] == "complete" and 'You said: "hello mock"' in final["content"]
        assert deltas_text(events) == final["content"]
        # The mock model answers without any I/O: the frames still come in protocol order.
        assert _shape(events) == NEW_CONVERSATION_SHAPE


async def test_history_survives_a_restart(tmp_path: Path, provider: FakeOpenAI) -> None:
    from websockets.asyncio.client import connect

    settings = make_settings(tmp_path, provider)
    provider.enqueue(Reply(text="remember me"))
    async with running(settings) as app, connect(app.url) as ws:
        client = Client(ws)
        await client.send(type="send", content="first life")
        conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
        await client.until_reply()
    async with running(settings) as app, connect(app.url) as ws:
        page = await Client(ws).request(type="history", conversation_id=conversation_id)
        assert [m["content"] for m in page["messages"]] == ["first life", "remember me"]
        assert all(m["status"] == "complete" for m in page["messages"])


async def test_health_and_page(http: Any) -> None:
    status, body = await http("/healthz")
    assert status == 200 and body == {"status": "ok"}
    status, body = await http("/readyz")
    assert status == 200
    status, page = await http("/")
    assert status == 200 and b"<html" in page.lower()
    status, _ = await http("/static/../pyproject.toml")
    assert status == 404
    status, _ = await http("/nothing-here")
    assert status == 404


async def test_replies_of_one_conversation_come_in_order(
    client: Client, provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(text="slow first answer", chunks=3, chunk_delay=0.05), Reply(text="second answer")
    )
    await client.send(type="send", content="one")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.send(type="send", conversation_id=conversation_id, content="two")
    await client.until_reply()
    events = await client.until_reply()
    assert final_message(client.seen)["content"] == "second answer"
    finals = [
        e["message"]["content"]
        for e in client.seen
        if e["type"] == "message"
        and e["message"]["role"] == "assistant"
        and e["message"]["status"] == "complete"
    ]
    assert finals == ["slow first answer", "second answer"]
    assert events
    await asyncio.sleep(0)


def test_lagging_writer_merges_consecutive_deltas() -> None:
    import json
    from collections import deque

    from cortex.protocol import delta_frame, take_merged_delta

    queue: deque[str] = deque(
        [
            delta_frame("c", "m", 3, "lo "),
            delta_frame("c", "m", 6, "wor"),
            delta_frame("c", "other", 0, "x"),
            delta_frame("c", "m", 9, "ld"),
        ]
    )
    frame, taken = take_merged_delta(delta_frame("c", "m", 0, "Hel"), queue)
    assert json.loads(frame) == {
        "type": "delta",
        "conversation_id": "c",
        "message_id": "m",
        "offset": 0,
        "text": "Hello wor",
    }
    assert taken > 0 and len(queue) == 2  # another message's delta stops the merge
    alone, taken = take_merged_delta(delta_frame("c", "m", 50, "gap"), deque([queue[-1]]))
    assert json.loads(alone)["text"] == "gap" and taken == 0  # not contiguous: not merged


async def test_http_and_ws_history_show_a_streaming_replys_live_text(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    """Both read through the pipeline: a reply mid-stream shows the text streamed so far, not
    its last checkpoint (here none is written for a minute)."""
    app = await start_server(checkpoint_ms=60_000)
    provider.enqueue(Reply(text=" ".join(f"w{i}" for i in range(200)), chunk_delay=0.02))
    client: Client = await connect_to(app)
    await client.send(type="send", content="go")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    events = await client.until(lambda e: e["type"] == "delta" and e["offset"] > 20)
    seen = deltas_text(events)
    page = await client.request(type="history", conversation_id=conversation_id)
    (ws_reply,) = [m for m in page["messages"] if m["role"] == "assistant"]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.port}") as session:
        path = f"/api/conversations/{conversation_id}/messages"
        async with session.get(path) as response:
            body = await response.json()
    (http_reply,) = [m for m in body["messages"] if m["role"] == "assistant"]
    for reply in (ws_reply, http_reply):
        assert reply["status"] == "streaming"
        assert reply["content"].startswith(seen) and len(reply["content"]) >= len(seen)
    stored, _ = await app.store.messages(conversation_id)
    assert stored[-1].content == ""  # what the HTTP API used to show: the last checkpoint
    await client.send(type="cancel", conversation_id=conversation_id)
    await client.until_reply()
