"""Search over the wire: the `search` frame, `GET /api/search`, and `history {around_seq}`, on a
real server with the fake provider, for two users whose texts share words."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Client, final_message, make_settings

from cortex.app import Cortex
from cortex.config import Settings
from cortex.testing.fake_openai import FakeOpenAI, Reply

ALICE = "alice-" + "A1" * 20
BOB = "bob-" + "B2" * 20


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOpenAI, database_url: str) -> Settings:
    return make_settings(
        tmp_path, provider, database_url=database_url, auth_tokens=f"{ALICE}:alice, {BOB}:bob"
    )


@pytest.fixture
async def get(server: Cortex) -> AsyncIterator[Callable[..., Any]]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:

        async def _get(path: str, token: str = ALICE, **params: Any) -> tuple[int, Any]:
            async with session.get(path, params=params, headers=bearer(token)) as response:
                return response.status, json.loads(await response.read())

        yield _get


async def chat(client: Client, content: str, conversation_id: str | None = None) -> str:
    ack = await client.request(type="send", content=content, conversation_id=conversation_id)
    conversation: str = ack["conversation_id"]
    if conversation_id is None:
        await client.request(type="subscribe", conversation_id=conversation, after_seq=0)
    final_message(await client.until_reply())
    return conversation


async def test_search_frame_finds_messages_replies_and_titles(
    connect_client: Callable[..., Any], provider: FakeOpenAI
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    bob: Client = await connect_client(additional_headers=bearer(BOB))
    provider.enqueue(Reply("Rotate the signing keys with cortex token."), Reply("Bob's keys too."))
    mine = await chat(alice, "how do I rotate keys")
    await chat(bob, "rotate my keys please")

    answer = await alice.request(type="search", query="rotate keys")
    assert answer["type"] == "search_results" and answer["next_cursor"] is None
    items = answer["items"]
    assert {i["conversation_id"] for i in items} == {mine}
    assert sorted(i["kind"] for i in items) == ["message", "message", "title"]
    reply = next(i for i in items if i["role"] == "assistant")
    assert reply["snippet"] == "Rotate the signing keys with cortex token."
    assert [reply["snippet"][a:b] for a, b in reply["highlights"]] == ["Rotate", "keys"]
    assert reply["seq"] == 2 and reply["on_active_path"] is True
    assert reply["created_at"].endswith("Z")
    title = next(i for i in items if i["kind"] == "title")
    assert (title["message_id"], title["seq"], title["role"]) == (None, None, None)


async def test_search_pages_with_a_cursor_and_refuses_a_forged_one(
    connect_client: Callable[..., Any],
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    conv = await chat(alice, "papaya one")
    for n in range(4):
        await chat(alice, f"papaya {n}", conv)
    first = await alice.request(type="search", query="papaya", limit=2)
    second = await alice.request(
        type="search", query="papaya", limit=2, cursor=first["next_cursor"]
    )
    third = await alice.request(
        type="search", query="papaya", limit=2, cursor=second["next_cursor"]
    )
    seen = [i["seq"] for page in (first, second, third) for i in page["items"]]
    assert len(seen) == 6 and third["next_cursor"] is None  # 5 messages and the title
    for cursor in ["forged", first["next_cursor"] + "x", "eyJvIjo1LCJzIjoiMTIzIn0"]:
        error = await alice.request(type="search", query="papaya", cursor=cursor)
        assert (error["type"], error["code"]) == ("error", "bad_frame"), cursor
    # A cursor of another query is refused too.
    other = await alice.request(type="search", query="papaya one", cursor=first["next_cursor"])
    assert other["code"] == "bad_frame"
    assert (await alice.request(type="ping"))["type"] == "pong"  # the connection goes on


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"query": "x" * 10_000}, "too_large"),
        ({"query": "x", "after": "yesterday"}, "bad_frame"),
        ({"query": "x", "before": "2026-13-45"}, "bad_frame"),
        ({"query": "x", "limit": 10_000}, "bad_frame"),
        ({"query": "x", "limit": 0}, "bad_frame"),
        ({"query": "x", "role": "tool"}, "bad_frame"),
        ({"query": 42}, "bad_frame"),
    ],
)
async def test_bad_search_frames_are_typed_errors(
    connect_client: Callable[..., Any], frame: dict[str, Any], code: str
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    error = await alice.request(type="search", **frame)
    assert (error["type"], error["code"]) == ("error", code)


@pytest.mark.parametrize(
    "query", ["", "the", '"unbalanced', "-", "*", "NEAR(", "OR", "AND", "content:", "'; --"]
)
async def test_forgiven_queries_answer_results(
    connect_client: Callable[..., Any], query: str
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    answer = await alice.request(type="search", query=query)
    assert (answer["type"], answer["items"], answer["next_cursor"]) == ("search_results", [], None)


async def test_http_search_is_per_user_with_the_same_errors(
    connect_client: Callable[..., Any], get: Callable[..., Any]
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    bob: Client = await connect_client(additional_headers=bearer(BOB))
    mine = await chat(alice, "guava shared words")
    theirs = await chat(bob, "guava shared words")
    status, body = await get("/api/search", q="guava", role="user")
    assert status == 200 and [i["conversation_id"] for i in body["items"]] == [mine]
    status, body = await get("/api/search", BOB, q="shared guava")
    assert {i["conversation_id"] for i in body["items"]} == {theirs}
    status, body = await get("/api/search", q="guava", after="2000-01-01T00:00:00Z", limit="9999")
    assert status == 200 and len(body["items"]) == 2  # the limit is clamped to the page bound
    assert (await get("/api/search", q="x" * 2_000))[0] == 413  # past 1,000 characters
    for params in [{"after": "nope"}, {"limit": "ten"}, {"cursor": "forged"}, {"role": "x"}]:
        status, body = await get("/api/search", q="guava", **params)
        assert (status, body["error"]["code"]) == (400, "bad_frame"), params
    async with aiohttp.ClientSession(f"http://127.0.0.1:{alice.ws.remote_address[1]}") as s:
        async with s.get("/api/search", params={"q": "guava"}) as response:
            assert response.status == 401
        # 10,000 characters make a request line longer than the HTTP layer reads (8 KiB):
        # refused there, before any search, with a 414 and not a 500.
        long = {"q": "x" * 10_000}
        async with s.get("/api/search", params=long, headers=bearer(ALICE)) as response:
            assert response.status == 414


async def test_history_around_seq_opens_a_deep_hit(connect_client: Callable[..., Any]) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    conv = await chat(alice, "message zero")
    for n in range(1, 12):
        await chat(alice, f"message {n}" + (" needle" if n == 3 else ""), conv)
    (hit,) = (await alice.request(type="search", query="needle"))["items"]
    page = await alice.request(type="history", conversation_id=conv, around_seq=hit["seq"], limit=4)
    seqs = [m["seq"] for m in page["messages"]]
    assert seqs == [hit["seq"] - 2, hit["seq"] - 1, hit["seq"], hit["seq"] + 1]
    assert page["has_more"] is True
    one = await alice.request(type="history", conversation_id=conv, around_seq=hit["seq"], limit=1)
    assert [m["seq"] for m in one["messages"]] == [hit["seq"]] and one["has_more"] is True
    error = await alice.request(type="history", conversation_id="nope", around_seq=1)
    assert error["code"] == "not_found"


async def test_http_messages_around_a_seq(
    connect_client: Callable[..., Any], get: Callable[..., Any]
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    conv = await chat(alice, "first")
    for n in range(5):
        await chat(alice, f"more {n}", conv)
    path = f"/api/conversations/{conv}/messages"
    status, body = await get(path, around_seq="6", limit="4")
    assert status == 200 and [m["seq"] for m in body["messages"]] == [4, 5, 6, 7]
    assert body["has_more"] is True
    for bad in ["x", "-1", str(2**60)]:
        status, body = await get(path, around_seq=bad)
        assert (status, body["error"]["code"]) == (400, "bad_frame"), bad
    assert (await get(path, BOB, around_seq="6"))[0] == 404


async def test_branches_mark_hits_off_the_path_and_a_deleted_branch_leaves_search(
    connect_client: Callable[..., Any], provider: FakeOpenAI
) -> None:
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    provider.enqueue(Reply("first answer"), Reply("second answer"))
    conv = await chat(alice, "alpha question")
    (first,) = (await alice.request(type="search", query="alpha", role="user"))["items"]
    assert first["kind"] == "message" and first["on_active_path"] is True

    await alice.request(
        type="edit", conversation_id=conv, message_id=first["message_id"], content="bravo question"
    )
    final_message(await alice.until_reply())
    hits = (await alice.request(type="search", query="alpha", role="user"))["items"]
    assert [(h["message_id"], h["on_active_path"]) for h in hits] == [(first["message_id"], False)]
    assert (await alice.request(type="search", query="bravo"))["items"][0]["on_active_path"]

    # Opening the hit shows the branch it is on, not the active path.
    page = await alice.request(type="history", conversation_id=conv, around_seq=first["seq"])
    assert [m["content"] for m in page["messages"]] == ["alpha question", "first answer"]

    await alice.request(type="delete_branch", conversation_id=conv, message_id=first["message_id"])
    # The title (the first question) stays; the branch's messages leave the index.
    kinds = [h["kind"] for h in (await alice.request(type="search", query="alpha"))["items"]]
    assert kinds == ["title"]
    assert (await alice.request(type="search", query="first answer"))["items"] == []
