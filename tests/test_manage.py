"""Conversation management over the WebSocket and HTTP: rename, configure, delete, export,
per-conversation settings, automatic titles, and other users kept out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Client, eventually, final_message, make_settings

from cortex.app import Cortex, running
from cortex.testing.fake_openai import FakeOpenAI, Reply

# The protocol promises hold on either store (docs/scaling.md).
BOTH_BACKENDS = True

ALICE = "alice-" + "A1" * 20
BOB = "bob-" + "B2" * 20


async def start(client: Client, content: str, **extra: Any) -> str:
    await client.send(type="send", content=content, **extra)
    conversation_id: str = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    return conversation_id


async def get(app: Cortex, path: str, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.port}{path}", headers=headers) as response,
    ):
        body = await response.read()
        if "json" in response.headers.get("Content-Type", ""):
            return response.status, json.loads(body), response.headers
        return response.status, body.decode(), response.headers


async def test_rename_reaches_every_subscriber_and_the_listings(
    connect_client: Any, provider: FakeOpenAI, server: Cortex
) -> None:
    alice: Client = await connect_client()
    tab: Client = await connect_client()  # the same user in another tab
    conversation_id = await start(alice, "first words")
    await tab.send(type="subscribe", conversation_id=conversation_id)
    assert (await tab.request(type="ping"))["type"] == "pong"

    answer = await alice.request(
        type="rename", conversation_id=conversation_id, title="  Trip\nplanning  "
    )
    assert answer["type"] == "ack" and answer["conversation_id"] == conversation_id
    announced = [e for e in alice.seen if e["type"] == "conversation"]
    assert announced[-1]["conversation"]["title"] == "Trip planning"
    seen_by_tab = (await tab.until_type("conversation"))[-1]
    assert seen_by_tab["conversation_id"] == conversation_id
    assert seen_by_tab["conversation"]["title"] == "Trip planning"

    listing = await alice.request(type="conversations")
    assert listing["items"][0]["title"] == "Trip planning"
    _, body, _ = await get(server, "/api/conversations")
    assert body["items"][0]["title"] == "Trip planning"
    for bad in ("", "   ", "x" * 201):
        error = await alice.request(type="rename", conversation_id=conversation_id, title=bad)
        assert error["type"] == "error" and error["code"] == "bad_frame"
    missing = await alice.request(type="rename", conversation_id="0" * 32, title="nope")
    assert missing["code"] == "not_found"


async def test_settings_chosen_at_creation_apply_to_every_reply(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    provider.enqueue(Reply(text="one"), Reply(text="two"))
    conversation_id = await start(
        client, "hello", temperature=0.25, system_prompt="Answer in French."
    )
    await client.send(type="send", conversation_id=conversation_id, content="again")
    await client.until_reply()
    for request in provider.requests[-2:]:
        assert request["temperature"] == 0.25
        assert request["messages"][0] == {"role": "system", "content": "Answer in French."}
    _, body, _ = await get(server, "/api/conversations")
    item = body["items"][0]
    assert item["temperature"] == 0.25 and item["system_prompt"] == "Answer in French."
    error = await client.request(type="send", content="hot", temperature=2.5)
    assert error["code"] == "bad_frame"


async def test_configure_changes_the_next_replies_and_null_restores_defaults(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(allowed_models="openai/other-model")
    client: Client = await connect_to(app)
    provider.enqueue(Reply(text="a"), Reply(text="b"), Reply(text="c"))
    conversation_id = await start(client, "hi")
    answer = await client.request(
        type="configure",
        conversation_id=conversation_id,
        model="openai/other-model",
        system_prompt="Be brief.",
        temperature=0.5,
    )
    assert answer["type"] == "ack"
    view = [e for e in client.seen if e["type"] == "conversation"][-1]["conversation"]
    assert view["model"] == "openai/other-model" and view["temperature"] == 0.5
    assert view["system_prompt"] == "Be brief."

    await client.send(type="send", conversation_id=conversation_id, content="short please")
    events = await client.until_reply()
    sent = provider.requests[-1]
    assert sent["model"] == "other-model" and sent["temperature"] == 0.5
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert final_message(events)["model"] == "openai/other-model"

    answer = await client.request(
        type="configure", conversation_id=conversation_id, model=None, temperature=None
    )
    assert answer["type"] == "ack"
    await client.send(type="send", conversation_id=conversation_id, content="and now?")
    await client.until_reply()
    sent = provider.requests[-1]
    assert sent["model"] == "fake-model" and "temperature" not in sent
    assert sent["messages"][0]["content"] == "Be brief."  # left out: unchanged

    for bad in (
        {"model": "openai/not-allowed"},
        {"temperature": 3},
        {"temperature": "hot"},
        {},
        {"title": "not a setting"},
    ):
        error = await client.request(type="configure", conversation_id=conversation_id, **bad)
        assert error["code"] == "bad_frame", bad


async def test_delete_cancels_the_reply_and_removes_everything(
    connect_client: Any, provider: FakeOpenAI, server: Cortex
) -> None:
    provider.enqueue(Reply(text="done"), Reply(text="never ending", chunks=6, stall_after=2))
    alice: Client = await connect_client()
    tab: Client = await connect_client()
    conversation_id = await start(alice, "to be deleted")
    await tab.send(type="subscribe", conversation_id=conversation_id)
    await alice.send(type="send", conversation_id=conversation_id, content="talk forever")
    await tab.until_type("delta")  # the second reply is streaming (and stalls)

    answer = await alice.request(type="delete", conversation_id=conversation_id)
    assert answer["type"] == "ack"
    await tab.until_type("conversation")
    for client in (alice, tab):
        # (The tab, the same user, also heard of the conversation when it was created.)
        kinds = [e["type"] if not e.get("deleted") else "deleted" for e in client.seen]
        gone = kinds.index("deleted")
        assert client.seen[gone]["type"] == "conversation"
        assert final_message(client.seen[:gone])["status"] == "cancelled"
    assert await server.store.count_messages(conversation_id) == 0
    assert (await alice.request(type="history", conversation_id=conversation_id))[
        "code"
    ] == "not_found"
    assert (await alice.request(type="conversations"))["items"] == []
    status, body, _ = await get(server, f"/api/conversations/{conversation_id}/messages")
    assert status == 404 and body["error"]["code"] == "not_found"
    await eventually(lambda: provider.active_requests == 0)
    assert server.hub.subscriber_count(conversation_id) == 0
    again = await alice.request(type="delete", conversation_id=conversation_id)
    assert again["code"] == "not_found"


async def test_export_as_json_and_markdown(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    provider.enqueue(Reply(text="Use `print()`:\n```python\nprint('hi')\n```"))
    conversation_id = await start(client, "How do I print in Python?", temperature=0.1)
    status, body, headers = await get(
        server, f"/api/conversations/{conversation_id}/export?format=json"
    )
    assert status == 200
    assert headers["Content-Disposition"] == (
        f'attachment; filename="cortex-how-do-i-print-in-python-{conversation_id[:8]}.json"'
    )
    assert body["format"] == "cortex.conversation.v1"
    assert body["conversation"]["id"] == conversation_id
    assert body["conversation"]["temperature"] == 0.1
    assert [(m["seq"], m["role"]) for m in body["messages"]] == [(1, "user"), (2, "assistant")]
    assert body["messages"][1]["content"].startswith("Use `print()`")
    assert body["messages"][1]["usage"]["completion_tokens"] > 0

    status, text, headers = await get(
        server, f"/api/conversations/{conversation_id}/export?format=md"
    )
    assert status == 200 and headers["Content-Type"].startswith("text/markdown")
    assert headers["Content-Disposition"].endswith('.md"')
    assert text.startswith("# How do I print in Python?\n")
    assert "## User" in text and "How do I print in Python?" in text
    assert "## Assistant (openai/fake-model)" in text and "print('hi')" in text

    assert (await get(server, f"/api/conversations/{conversation_id}/export?format=xml"))[0] == 400
    assert (await get(server, "/api/conversations/nope/export?format=md"))[0] == 404


async def test_other_users_cannot_manage_or_export(tmp_path: Path, provider: FakeOpenAI) -> None:
    from websockets.asyncio.client import connect

    settings = make_settings(tmp_path, provider, auth_tokens=f"{ALICE}:alice, {BOB}:bob")
    provider.enqueue(Reply(text="alice's answer"))
    async with (
        running(settings) as app,
        connect(app.url, additional_headers={"Authorization": f"Bearer {ALICE}"}) as a,
        connect(app.url, additional_headers={"Authorization": f"Bearer {BOB}"}) as b,
    ):
        alice, bob = Client(a), Client(b)
        target = await start(alice, "alice's private chat")
        probes: list[dict[str, Any]] = [
            {"type": "rename", "title": "mine now"},
            {"type": "configure", "temperature": 1.0},
            {"type": "delete"},
        ]
        for probe in probes:
            answer = await bob.request(**probe, conversation_id=target)
            unknown = await bob.request(**probe, conversation_id="0" * 32)
            assert answer["code"] == unknown["code"] == "not_found", probe
            assert answer["message"] == unknown["message"]
        for fmt in ("json", "md"):
            path = f"/api/conversations/{target}/export?format={fmt}"
            status, body, _ = await get(app, path, BOB)
            assert status == 404 and body["error"]["code"] == "not_found"
            assert (await get(app, path, ALICE))[0] == 200
        assert (await get(app, f"/api/conversations/{target}/export"))[0] == 401
        listing = await alice.request(type="conversations")
        assert listing["items"][0]["title"] == "alice's private chat"
        assert listing["items"][0].get("temperature") is None
        assert await app.store.count_messages(target) == 2


async def test_auto_title_after_the_first_reply(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(auto_title=True)
    client: Client = await connect_to(app)
    provider.enqueue(
        Reply(text="Paris is the capital of France."),
        Reply(text='"Capital of France."\n'),
        Reply(text="About two million."),
    )
    conversation_id = await start(client, "what is the capital of france, please tell me")
    titled = (await client.until_type("conversation"))[-1]
    assert titled["conversation"]["title"] == "Capital of France"
    title_request = provider.requests[1]
    assert not title_request.get("stream") and title_request["max_tokens"] == 24
    assert "Paris is the capital of France." in title_request["messages"][-1]["content"]
    # Only the first reply asks for a title.
    await client.send(type="send", conversation_id=conversation_id, content="population?")
    await client.until_reply()
    assert len(provider.requests) == 3
    listing = await client.request(type="conversations")
    assert listing["items"][0]["title"] == "Capital of France"
