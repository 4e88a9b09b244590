"""Scale-out: two `cortex serve` processes on one PostgreSQL and one Redis (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, Client, deltas_text, final_message
from processes import cortex_process
from websockets.asyncio.client import connect

from cortex.testing.fake_openai import FakeOpenAI, Reply
from cortex.testing.services import RedisServer

pytestmark = pytest.mark.slow

LONG = " ".join(f"word{i}" for i in range(300))


@asynccontextmanager
async def two_processes(
    tmp_path: Path, provider: FakeOpenAI, database_url: str, redis_url: str, **settings: str
) -> AsyncIterator[list[tuple[asyncio.subprocess.Process, str]]]:
    async with AsyncExitStack() as stack:
        procs = []
        for _ in range(2):
            procs.append(
                await stack.enter_async_context(
                    cortex_process(
                        tmp_path, provider, database_url, redis_url=redis_url, **settings
                    )
                )
            )
        yield procs


@asynccontextmanager
async def clients(*urls: str) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        yield [Client(await stack.enter_async_context(connect(url))) for url in urls]


async def until_ready(probe: Callable[[], Awaitable[int]], status: int) -> None:
    """Poll /readyz: nothing announces that a process lost or found Redis."""
    async with asyncio.timeout(TIMEOUT * 2):
        while await probe() != status:  # noqa: ASYNC110 - polls another process's state
            await asyncio.sleep(0.05)


async def new_conversation(client: Client, content: str = "hello") -> str:
    await client.send(type="send", content=content)
    conversation_id: str = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    return conversation_id


async def test_clients_on_two_processes_see_each_others_replies(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(
        Reply(text="first"),
        Reply(text="a reply made in process A", chunks=6, chunk_delay=0.01),
        Reply(text="and one asked through B", chunks=5, chunk_delay=0.01),
    )
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url) as procs,
        clients(procs[0][1], procs[1][1]) as (alice, bob),
    ):
        conversation_id = await new_conversation(alice)
        assert (await bob.request(type="subscribe", conversation_id=conversation_id))[
            "type"
        ] == "ack"
        await alice.send(type="send", conversation_id=conversation_id, content="again")
        seen_by_bob = await bob.until_reply()
        assert deltas_text(seen_by_bob) == "a reply made in process A"
        assert final_message(seen_by_bob)["status"] == "complete"
        assert final_message(await alice.until_reply())["id"] == final_message(seen_by_bob)["id"]
        # And the other way round: a message sent through B is answered to both.
        await bob.send(type="send", conversation_id=conversation_id, content="from bob")
        seen_by_alice = await alice.until_reply()
        users = [
            e["message"]["content"]
            for e in seen_by_alice
            if e["type"] == "message" and e["message"]["role"] == "user"
        ]
        assert users == ["from bob"]
        assert deltas_text(seen_by_alice) == "and one asked through B"
        await bob.until_reply()
        page = await bob.request(type="history", conversation_id=conversation_id)
        assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4, 5, 6]


async def test_concurrent_sends_through_both_processes_are_answered_in_order(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    def echo(body: dict[str, Any]) -> Reply:
        asked = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        return Reply(text=f"re: {asked}", chunks=3, chunk_delay=0.005)

    provider.responder = echo
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url) as procs,
        clients(procs[0][1], procs[1][1]) as (alice, bob),
    ):
        conversation_id = await new_conversation(alice, "start")
        await bob.request(type="subscribe", conversation_id=conversation_id)
        sends = [(client, f"m{i}") for i in range(6) for client in (alice, bob)]
        await asyncio.gather(
            *(
                c.send(type="send", conversation_id=conversation_id, content=text)
                for c, text in sends
            )
        )

        def answered(events: list[dict[str, Any]]) -> int:
            return sum(
                1
                for e in events
                if e["type"] == "message"
                and e["message"]["role"] == "assistant"
                and e["message"]["status"] == "complete"
            )

        await alice.until(lambda _e: answered(alice.seen) >= 13, timeout=TIMEOUT * 3)
        page = await alice.request(type="history", conversation_id=conversation_id, limit=200)
    rows = page["messages"]  # the active path, root first
    assert sorted(m["seq"] for m in rows) == list(range(1, 27))  # gap-free and unique
    # Each send queued behind a reply follows the reply it waited for (issue #20).
    assert [m["role"] for m in rows] == ["user", "assistant"] * 13
    users = [m for m in rows if m["role"] == "user"]
    replies = [m for m in rows if m["role"] == "assistant"]
    assert len(users) == len(replies) == 13
    assert all(m["status"] == "complete" for m in replies)
    # Answered one at a time, in seq order: each reply answers the oldest unanswered message,
    # and each request to the model already holds every earlier reply.
    assert [r["content"] for r in replies] == [f"re: {u['content']}" for u in users]
    assert len(provider.requests) == 13
    for k, request in enumerate(provider.requests):
        seen_replies = [m for m in request["messages"] if m["role"] == "assistant"]
        assert [m["content"] for m in seen_replies] == [r["content"] for r in replies[:k]]


async def test_cancel_reaches_the_process_that_generates(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(Reply(text="ok"), Reply(text=LONG, chunk_delay=0.02))
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url) as procs,
        clients(procs[0][1], procs[1][1]) as (alice, bob),
    ):
        conversation_id = await new_conversation(alice)
        await bob.request(type="subscribe", conversation_id=conversation_id)
        await alice.send(type="send", conversation_id=conversation_id, content="go on and on")
        await bob.until_type("delta")
        await bob.send(type="cancel", conversation_id=conversation_id)
        final = final_message(await bob.until_reply())
        assert final["status"] == "cancelled"
        assert final["content"] and LONG.startswith(final["content"]) and final["content"] != LONG
        assert final_message(await alice.until_reply())["status"] == "cancelled"


async def test_resume_on_the_other_process_mid_reply(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(Reply(text="ok"), Reply(text=LONG, chunk_delay=0.01))
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url) as procs,
        clients(procs[0][1]) as (alice,),
    ):
        conversation_id = await new_conversation(alice)
        await alice.send(type="send", conversation_id=conversation_id, content="a long one")
        await alice.until(lambda e: e["type"] == "delta" and e["offset"] > 300)
        async with connect(procs[1][1]) as ws:
            bob = Client(ws)
            await bob.send(type="subscribe", conversation_id=conversation_id, after_seq=2)
            events = await bob.until_reply()
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["message", "message"]  # the user message and the reply so far
        assert "typing" in kinds[: kinds.index("ack")]
        first = next(e for e in events if e["type"] == "delta")
        assert first["offset"] == 0 and len(first["text"]) > 300  # the text so far at once
        # Then every later delta live, with exact offsets: no gap, no overlap.
        assert deltas_text(events) == LONG
        assert final_message(events)["content"] == LONG


async def test_sigkill_of_the_generating_process_hands_the_conversation_over(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(
        Reply(text="ok"),
        Reply(text=LONG, chunk_delay=0.02),
        Reply(text="the queued one, answered by the survivor"),
        Reply(text="and the conversation goes on"),
    )
    fast = {"reply_lease_s": "2", "sweep_interval_s": "0.3"}
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url, **fast) as procs,
        clients(procs[0][1], procs[1][1]) as (alice, bob),
    ):
        (victim, _), _survivor = procs
        conversation_id = await new_conversation(alice)
        await bob.request(type="subscribe", conversation_id=conversation_id)
        await alice.send(type="send", conversation_id=conversation_id, content="long")
        await alice.until_type("delta")  # process A holds the lease: it took the message
        await alice.send(type="send", conversation_id=conversation_id, content="queued")
        await alice.until(lambda e: e["type"] == "ack")
        await bob.until(lambda e: e["type"] == "delta" and e["offset"] > 200)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        # The lease expires; process B settles the cut reply and answers the queued message.
        events = await bob.until(
            lambda e: (
                e["type"] == "message"
                and e["message"]["content"] == "the queued one, answered by the survivor"
            ),
            timeout=TIMEOUT * 2,
        )
        statuses = {
            e["message"]["seq"]: e["message"]["status"] for e in events if e["type"] == "message"
        }
        assert statuses[4] == "interrupted"
        await bob.until_reply()  # the typing off that ends the queued reply
        await bob.send(type="send", conversation_id=conversation_id, content="still there?")
        assert final_message(await bob.until_reply())["content"] == "and the conversation goes on"
        page = await bob.request(type="history", conversation_id=conversation_id)
    rows = [(m["seq"], m["role"], m["status"]) for m in page["messages"]]
    assert rows == [
        (1, "user", "complete"),
        (2, "assistant", "complete"),
        (3, "user", "complete"),
        (4, "assistant", "interrupted"),
        (5, "user", "complete"),
        (6, "assistant", "complete"),
        (7, "user", "complete"),
        (8, "assistant", "complete"),
    ]
    interrupted = page["messages"][3]["content"]
    assert interrupted and LONG.startswith(interrupted)


async def test_a_process_that_loses_redis_keeps_serving_and_reconnects(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str
) -> None:
    provider.enqueue(Reply(text="before"), Reply(text="after Redis came back"))
    with RedisServer() as redis:
        async with (
            two_processes(
                tmp_path, provider, postgres_url, redis.url, sweep_interval_s="0.3"
            ) as procs,
            clients(procs[0][1]) as (alice,),
            aiohttp.ClientSession() as http,
        ):
            ready_url = procs[0][1].replace("ws://", "http://").replace("/ws", "/readyz")

            async def ready() -> int:
                async with http.get(ready_url) as response:
                    return response.status

            assert await ready() == 200
            conversation_id = await new_conversation(alice)
            redis.kill()
            await until_ready(ready, 503)
            # Still serving its own clients: history, and sends are stored and acknowledged.
            page = await alice.request(type="history", conversation_id=conversation_id)
            assert len(page["messages"]) == 2
            ack = await alice.request(
                type="send", conversation_id=conversation_id, content="are you there?"
            )
            assert ack["type"] == "ack" and ack["seq"] == 3
            redis.start()
            await until_ready(ready, 200)
            # The reply waited for the lease, and comes once Redis is back.
            events = await alice.until(
                lambda e: (
                    e["type"] == "message"
                    and e["message"]["seq"] == 4
                    and e["message"]["status"] == "complete"
                ),
                timeout=TIMEOUT * 2,
            )
            assert events[-1]["message"]["content"] == "after Redis came back"
