"""Conversation trees on two processes (PostgreSQL + Redis): an edit on one process during a
reply generated on the other cancels that reply once and is answered once; clients on both
see the new active path (issue #20)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import final_message
from test_scale import LONG, clients, new_conversation, two_processes

from cortex.testing.fake_openai import FakeOpenAI, Reply, last_user_text
from cortex.testing.services import RedisServer

pytestmark = pytest.mark.slow


async def test_an_edit_on_one_process_cancels_the_reply_on_the_other(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(Reply(text="ok"), Reply(text=LONG, chunk_delay=0.02))
    async with (
        two_processes(tmp_path, provider, postgres_url, redis_server.url) as procs,
        clients(procs[0][1], procs[1][1]) as (alice, bob),
    ):
        conversation_id = await new_conversation(alice, "first")
        await bob.request(type="subscribe", conversation_id=conversation_id)
        await alice.send(type="send", conversation_id=conversation_id, content="go on and on")
        await bob.until_type("delta")  # process A generates it
        page = await bob.request(type="history", conversation_id=conversation_id)
        asked = page["messages"][2]
        assert asked["content"] == "go on and on"
        provider.enqueue(Reply(text="the edited answer"))
        ack = await bob.request(
            type="edit",
            conversation_id=conversation_id,
            message_id=asked["id"],
            content="short, please",
        )
        assert ack["type"] == "ack"
        for someone in (alice, bob):
            events = await someone.until(
                lambda e: (
                    e["type"] == "message"
                    and e["message"]["content"] == "the edited answer"
                    and e["message"]["status"] == "complete"
                )
            )
            finals = [
                e["message"]["status"]
                for e in events
                if e["type"] == "message"
                and e["message"]["role"] == "assistant"
                and e["message"]["status"] != "streaming"
                and e["message"]["content"] != "the edited answer"
            ]
            assert finals == ["cancelled"]  # the old reply ended once
            leaves = [e["active_leaf_id"] for e in events if e["type"] == "conversation"]
            assert leaves == [ack["message_id"]]
            assert final_message(events)["content"] == "the edited answer"
        for someone in (alice, bob):
            page = await someone.request(type="history", conversation_id=conversation_id)
            assert [m["content"] for m in page["messages"]] == [
                "first",
                "ok",
                "short, please",
                "the edited answer",
            ]
        asked_for = [last_user_text(body) for body in provider.requests]
        assert asked_for.count("short, please") == 1  # answered once
