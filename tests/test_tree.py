"""Conversations as trees (issue #20): parents, the active path, edit, regenerate,
switch_branch, delete_branch, fork, their bad inputs, and the backfill of migration 0005."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from conftest import Client, final_message, make_settings
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import connect

from cortex.app import Cortex, running
from cortex.store import migrate
from cortex.testing.fake_openai import FakeOpenAI, Reply, last_user_text

BOTH_BACKENDS = True

ALICE = "alice-" + "A1" * 20
BOB = "bob-" + "B2" * 20


def echo(provider: FakeOpenAI) -> None:
    """Each reply names the user text it answers and how many messages the model saw."""
    provider.responder = lambda body: Reply(
        text=f"re {last_user_text(body)} ({len(body['messages'])})"
    )


async def say(client: Client, content: str, **extra: Any) -> dict[str, Any]:
    """Send and wait for the whole reply: the ack."""
    rid = f"s-{content}"
    await client.send(type="send", content=content, request_id=rid, **extra)
    events = await client.until(lambda e: e.get("request_id") == rid)
    ack = events[-1]
    assert ack["type"] == "ack", ack
    await client.until_reply()
    return ack


async def history(client: Client, conversation_id: str, **extra: Any) -> list[dict[str, Any]]:
    page = await client.request(type="history", conversation_id=conversation_id, **extra)
    assert page["type"] == "history", page
    messages: list[dict[str, Any]] = page["messages"]
    return messages


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages]


async def test_send_stores_parents_and_history_is_the_active_path(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    echo(provider)
    ack = await say(client, "one")
    conversation_id = ack["conversation_id"]
    await say(client, "two", conversation_id=conversation_id)
    messages = await history(client, conversation_id)
    assert contents(messages) == ["one", "re one (2)", "two", "re two (4)"]
    assert "parent_id" not in messages[0]  # the root
    for parent, child in zip(messages, messages[1:], strict=False):
        assert child["parent_id"] == parent["id"]
    assert all(m["sibling_ids"] == [m["id"]] for m in messages)
    # The HTTP API reads the same path.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{server.port}/api/conversations/{conversation_id}/messages"
        ) as response,
    ):
        body = await response.json()
    assert [m["id"] for m in body["messages"]] == [m["id"] for m in messages]
    assert body["messages"][2]["sibling_ids"] == [messages[2]["id"]]
    assert await server.store.active_path_ids(conversation_id) == {m["id"] for m in messages}


async def test_edit_branches_and_both_clients_see_the_new_path(
    connect_client: Any, provider: FakeOpenAI
) -> None:
    echo(provider)
    alice: Client = await connect_client()
    tab: Client = await connect_client()
    conversation_id = (await say(alice, "one"))["conversation_id"]
    await say(alice, "two", conversation_id=conversation_id)
    old = await history(alice, conversation_id)
    await tab.request(type="subscribe", conversation_id=conversation_id)

    ack = await alice.request(
        type="edit", conversation_id=conversation_id, message_id=old[2]["id"], content="TWO"
    )
    assert ack["type"] == "ack" and ack["seq"] == 5
    for someone in (alice, tab):
        event = (await someone.until_type("conversation"))[-1]
        assert event["active_leaf_id"] == ack["message_id"]
        await someone.until_reply()
    # The model saw the new path only: one, its reply, TWO.
    assert provider.requests[-1]["messages"][-1]["content"] == "TWO"
    assert "two" not in [m["content"] for m in provider.requests[-1]["messages"]]
    new = await history(tab, conversation_id)
    assert contents(new) == ["one", "re one (2)", "TWO", "re TWO (4)"]
    assert new[2]["parent_id"] == old[2]["parent_id"]
    assert new[2]["sibling_ids"] == [old[2]["id"], ack["message_id"]]
    # The other branch is still there, read by its leaf.
    assert contents(await history(alice, conversation_id, leaf_id=old[3]["id"])) == contents(old)


async def test_regenerate_switch_and_delete_branch(client: Client, provider: FakeOpenAI) -> None:
    echo(provider)
    conversation_id = (await say(client, "one"))["conversation_id"]
    first = await history(client, conversation_id)
    ack = await client.request(
        type="regenerate", conversation_id=conversation_id, message_id=first[1]["id"]
    )
    assert ack["type"] == "ack" and ack["message_id"] != first[1]["id"]
    events = await client.until_reply()
    assert final_message(events)["id"] == ack["message_id"]  # the reply fills the acked row
    assert final_message(events)["model"] == first[1]["model"]  # the conversation's model
    path = await history(client, conversation_id)
    assert [m["id"] for m in path] == [first[0]["id"], ack["message_id"]]
    assert path[1]["sibling_ids"] == [first[1]["id"], ack["message_id"]]

    answer = await client.request(
        type="switch_branch", conversation_id=conversation_id, message_id=first[1]["id"]
    )
    assert answer["type"] == "ack"
    event = (await client.until_type("conversation"))[-1]
    assert event["active_leaf_id"] == first[1]["id"]
    assert [m["id"] for m in await history(client, conversation_id)] == [m["id"] for m in first]

    # Delete the active branch: the path moves to the sibling left.
    answer = await client.request(
        type="delete_branch", conversation_id=conversation_id, message_id=first[1]["id"]
    )
    assert answer["type"] == "ack"
    event = (await client.until_type("conversation"))[-1]
    assert event["active_leaf_id"] == ack["message_id"]
    path = await history(client, conversation_id)
    assert [m["id"] for m in path] == [first[0]["id"], ack["message_id"]]
    assert path[1]["sibling_ids"] == [ack["message_id"]]
    gone = await client.request(
        type="history", conversation_id=conversation_id, leaf_id=first[1]["id"]
    )
    assert gone["code"] == "not_found"
    # A send now follows the regenerated reply.
    await say(client, "two", conversation_id=conversation_id)
    assert contents(await history(client, conversation_id))[1:3] == [path[1]["content"], "two"]


async def test_delete_branch_to_the_parent_and_fork(client: Client, provider: FakeOpenAI) -> None:
    echo(provider)
    conversation_id = (await say(client, "one"))["conversation_id"]
    await say(client, "two", conversation_id=conversation_id)
    path = await history(client, conversation_id)

    ack = await client.request(
        type="fork", conversation_id=conversation_id, message_id=path[1]["id"]
    )
    assert ack["type"] == "ack" and ack["conversation_id"] != conversation_id
    forked = await history(client, ack["conversation_id"])
    assert contents(forked) == contents(path[:2])
    assert ack["message_id"] == forked[-1]["id"]
    assert {m["id"] for m in forked}.isdisjoint(m["id"] for m in path)
    # The fork goes on by itself; the original is unchanged.
    await say(client, "three", conversation_id=ack["conversation_id"])
    assert contents(await history(client, ack["conversation_id"]))[2:] == [
        "three",
        "re three (4)",
    ]
    assert await history(client, conversation_id) == path

    answer = await client.request(
        type="delete_branch", conversation_id=conversation_id, message_id=path[2]["id"]
    )
    assert answer["type"] == "ack"
    event = (await client.until_type("conversation"))[-1]
    assert event["active_leaf_id"] == path[1]["id"]  # no sibling: the parent
    assert await history(client, conversation_id) == path[:2]


async def test_retries_are_idempotent_across_send_edit_and_regenerate(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    echo(provider)
    conversation_id = (await say(client, "one", client_msg_id="c1"))["conversation_id"]
    path = await history(client, conversation_id)
    frame = {
        "type": "edit",
        "conversation_id": conversation_id,
        "message_id": path[0]["id"],
        "content": "ONE",
        "client_msg_id": "c2",
    }
    first = await client.request(**frame)
    await client.until_reply()
    again = await client.request(**frame)
    assert (again["message_id"], again["seq"]) == (first["message_id"], first["seq"])
    regenerate = {
        "type": "regenerate",
        "conversation_id": conversation_id,
        "message_id": path[1]["id"],
        "client_msg_id": "c3",
    }
    first = await client.request(**regenerate)
    await client.until_reply()
    again = await client.request(**regenerate)
    assert (again["message_id"], again["seq"]) == (first["message_id"], first["seq"])
    count = await server.store.count_messages(conversation_id)
    # One id space: an edit reusing a send's id, or a regenerate reusing an edit's, is refused.
    reused = await client.request(**frame | {"client_msg_id": "c1", "content": "other"})
    assert reused["code"] == "bad_frame"
    reused = await client.request(**regenerate | {"client_msg_id": "c2"})
    assert reused["code"] == "bad_frame"
    ping = await client.request(type="ping")
    assert ping["type"] == "pong"
    assert await server.store.count_messages(conversation_id) == count == 5


async def test_bad_tree_frames_are_typed_and_change_nothing(
    tmp_path: Path, provider: FakeOpenAI, database_url: str
) -> None:
    echo(provider)
    settings = make_settings(
        tmp_path,
        provider,
        database_url=database_url,
        auth_tokens=f"{ALICE}:alice, {BOB}:bob",
        max_message_chars=100,
    )
    async with (
        running(settings) as app,
        connect(app.url, additional_headers={"Authorization": f"Bearer {ALICE}"}) as a,
        connect(app.url, additional_headers={"Authorization": f"Bearer {BOB}"}) as b,
    ):
        alice, bob = Client(a), Client(b)
        target = (await say(alice, "one"))["conversation_id"]
        other = (await say(alice, "elsewhere"))["conversation_id"]
        path = await history(alice, target)
        elsewhere = await history(alice, other)
        user, reply = path[0]["id"], path[1]["id"]
        unknown = "0" * 32
        cases: list[tuple[Client, dict[str, Any], str]] = [
            (alice, {"type": "edit", "message_id": reply, "content": "x"}, "bad_frame"),
            (alice, {"type": "regenerate", "message_id": user}, "bad_frame"),
            (alice, {"type": "edit", "message_id": user, "content": "  "}, "bad_frame"),
            (alice, {"type": "edit", "message_id": user, "content": "x" * 101}, "too_large"),
            (alice, {"type": "edit", "message_id": unknown, "content": "x"}, "not_found"),
            (alice, {"type": "regenerate", "message_id": unknown}, "not_found"),
            (alice, {"type": "regenerate", "message_id": reply, "model": "nope/x"}, "bad_frame"),
            (alice, {"type": "switch_branch", "message_id": unknown}, "not_found"),
            (alice, {"type": "delete_branch", "message_id": unknown}, "not_found"),
            (alice, {"type": "fork", "message_id": unknown}, "not_found"),
            (alice, {"type": "history", "leaf_id": unknown}, "not_found"),
            (alice, {"type": "send", "content": "x", "parent_id": unknown}, "not_found"),
            (alice, {"type": "edit", "message_id": user}, "bad_frame"),  # no content
            (alice, {"type": "switch_branch"}, "bad_frame"),  # no message_id
            # A message of another conversation.
            (alice, {"type": "switch_branch", "message_id": elsewhere[0]["id"]}, "not_found"),
            (
                alice,
                {"type": "edit", "message_id": elsewhere[0]["id"], "content": "x"},
                "not_found",
            ),
            (alice, {"type": "send", "content": "x", "parent_id": elsewhere[1]["id"]}, "not_found"),
        ]
        for kind in ("switch_branch", "delete_branch", "fork", "regenerate"):
            cases.append((bob, {"type": kind, "message_id": reply}, "not_found"))
        cases.append((bob, {"type": "edit", "message_id": user, "content": "x"}, "not_found"))
        for who, frame, code in cases:
            answer = await who.request(conversation_id=target, **frame)
            assert answer["type"] == "error" and answer["code"] == code, (frame, answer)
        # A parent_id needs its conversation: no new conversation is made from it.
        answer = await alice.request(type="send", content="x", parent_id=user)
        assert answer["code"] == "bad_frame", answer
        assert await history(alice, target) == path
        assert await app.store.count_messages(target) == 2
        listing = await alice.request(type="conversations")
        assert len(listing["items"]) == 2  # no fork was made


async def test_edit_during_a_reply_cancels_it_and_skips_the_queued_turns(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    conversation_id = (await say(client, "one"))["conversation_id"]
    path = await history(client, conversation_id)
    provider.enqueue(Reply(text="slow " * 50, chunk_delay=0.05))
    await client.send(type="send", conversation_id=conversation_id, content="two")
    await client.until(lambda e: e["type"] == "delta")
    await client.request(type="send", conversation_id=conversation_id, content="queued")
    provider.enqueue(Reply(text="fresh answer"))
    ack = await client.request(
        type="edit", conversation_id=conversation_id, message_id=path[0]["id"], content="ONE"
    )
    assert ack["type"] == "ack"
    events = await client.until(
        lambda e: e["type"] == "message" and e["message"]["content"] == "fresh answer"
    )
    statuses = [
        e["message"]["status"]
        for e in events
        if e["type"] == "message" and e["message"]["content"].startswith("slow")
    ]
    assert statuses == ["cancelled"]  # the old reply ended once, cancelled
    await client.until_reply()
    assert contents(await history(client, conversation_id)) == ["ONE", "fresh answer"]
    # The queued message stays stored on its branch, unanswered: no third reply was asked for.
    await asyncio.sleep(0.3)
    assert len(provider.requests) == 3
    assert await server.store.count_messages(conversation_id) == 7


async def test_a_queued_send_follows_the_reply_it_waited_for(
    client: Client, provider: FakeOpenAI
) -> None:
    echo(provider)
    conversation_id = (await say(client, "one"))["conversation_id"]
    provider.enqueue(Reply(text="slow " * 20, chunk_delay=0.02))
    await client.send(type="send", conversation_id=conversation_id, content="two")
    await client.until(lambda e: e["type"] == "delta")
    await client.request(type="send", conversation_id=conversation_id, content="three")
    await client.until(
        lambda e: e["type"] == "message" and e["message"]["content"].startswith("re three")
    )
    path = await history(client, conversation_id)
    assert contents(path)[2:5] == ["two", ("slow " * 20), "three"]
    assert path[4]["parent_id"] == path[3]["id"]


async def test_migration_backfills_queued_sends_and_tool_replies(database_url: str) -> None:
    """A database made at 0004 (queued sends: A, B, reply A, reply B; a reply with a tool call)
    gets the tree the reply queue made, and the last message as its active leaf."""
    await asyncio.to_thread(migrate, database_url, "0004")
    rows = [
        ("a", 1, "user"),
        ("b", 2, "user"),
        ("ra", 3, "assistant"),
        ("rb", 4, "assistant"),
        ("c", 5, "user"),
        ("rc1", 6, "assistant"),
        ("tc", 7, "tool"),
        ("rc2", 8, "assistant"),
    ]
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO conversations (id, owner, title, last_seq, answered_seq,"
                    " created_at, updated_at)"
                    " VALUES ('k', 'u', 't', 8, 8, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
            for message_id, seq, role in rows:
                await connection.execute(
                    text(
                        "INSERT INTO messages (id, conversation_id, seq, role, content, status,"
                        " created_at, updated_at) VALUES (:id, 'k', :seq, :role, :content,"
                        " 'complete', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"id": message_id, "seq": seq, "role": role, "content": message_id},
                )
        await asyncio.to_thread(migrate, database_url)
        async with engine.begin() as connection:
            found = await connection.execute(text("SELECT id, parent_id FROM messages"))
            parents = {row[0]: row[1] for row in found}
            leaf = await connection.scalar(text("SELECT active_leaf_id FROM conversations"))
    finally:
        await engine.dispose()
    assert parents == {
        "a": None,
        "ra": "a",
        "b": "ra",
        "rb": "b",
        "c": "rb",
        "rc1": "c",
        "tc": "rc1",
        "rc2": "tc",
    }
    assert leaf == "rc2"


async def test_conversation_list_changes_reach_every_tab_of_the_user(
    connect_client: Any, provider: FakeOpenAI
) -> None:
    """A tab subscribed to nothing still hears of new, forked, renamed and deleted
    conversations (its sidebar, which it listed), from another tab of the same user. A
    connection that never listed them (a script) hears of none."""
    alice: Client = await connect_client()
    tab: Client = await connect_client()
    script: Client = await connect_client()
    listing = await tab.request(type="conversations")  # the sidebar: listening from now on
    assert listing["type"] == "conversations"
    assert (await script.request(type="ping"))["type"] == "pong"  # connected, never lists
    conversation_id = (await say(alice, "one"))["conversation_id"]
    listed = (await tab.until_type("conversation"))[-1]
    assert listed["conversation"]["id"] == conversation_id
    path = await history(alice, conversation_id)
    fork = await alice.request(
        type="fork", conversation_id=conversation_id, message_id=path[0]["id"]
    )
    listed = (await tab.until_type("conversation"))[-1]
    assert listed["conversation_id"] == fork["conversation_id"]
    await alice.request(type="rename", conversation_id=conversation_id, title="Renamed")
    listed = (await tab.until_type("conversation"))[-1]
    assert listed["conversation"]["title"] == "Renamed"
    await alice.request(type="delete", conversation_id=fork["conversation_id"])
    listed = (await tab.until_type("conversation"))[-1]
    assert listed == {
        "type": "conversation",
        "conversation_id": fork["conversation_id"],
        "deleted": True,
    }
    # Never a message of a conversation it did not subscribe to.
    assert not [e for e in tab.seen if e["type"] in ("message", "delta", "typing")]
    assert (await script.request(type="ping"))["type"] == "pong"  # after every event above
    assert [e["type"] for e in script.seen] == ["pong", "pong"]


async def test_export_has_every_branch(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    """JSON: every message with its parent; Markdown: the active path, then the others."""
    echo(provider)
    conversation_id = (await say(client, "one"))["conversation_id"]
    path = await history(client, conversation_id)
    await client.request(
        type="edit", conversation_id=conversation_id, message_id=path[0]["id"], content="uno"
    )
    await client.until_reply()
    base = f"http://127.0.0.1:{server.port}/api/conversations/{conversation_id}/export"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "?format=json") as response:
            exported = await response.json(content_type=None)
        async with session.get(base + "?format=md") as response:
            markdown = await response.text()
    messages = {m["content"]: m for m in exported["messages"]}
    assert set(messages) == {"one", "re one (2)", "uno", "re uno (2)"}
    assert messages["re one (2)"]["parent_id"] == messages["one"]["id"]
    assert messages["re uno (2)"]["parent_id"] == messages["uno"]["id"]
    assert exported["conversation"]["active_leaf_id"] == messages["re uno (2)"]["id"]
    active, _, others = markdown.partition("# Other branches")
    assert "uno" in active and "re uno (2)" in active and "re one" not in active
    assert "\none\n" in others and "re one (2)" in others
    assert f"after `{messages['one']['id']}`" in others


async def test_send_with_parent_id_opens_a_branch(client: Client, provider: FakeOpenAI) -> None:
    echo(provider)
    conversation_id = (await say(client, "one"))["conversation_id"]
    await say(client, "two", conversation_id=conversation_id)
    old = await history(client, conversation_id)
    await say(client, "three", conversation_id=conversation_id, parent_id=old[1]["id"])
    path = await history(client, conversation_id)
    assert contents(path) == ["one", "re one (2)", "three", "re three (4)"]
    assert path[2]["sibling_ids"] == [old[2]["id"], path[2]["id"]]
    assert provider.requests[-1]["messages"][-1]["content"] == "three"
    assert "two" not in [m["content"] for m in provider.requests[-1]["messages"]]


async def test_regenerate_during_a_reply_cancels_it(
    connect_client: Any, provider: FakeOpenAI
) -> None:
    alice: Client = await connect_client()
    tab: Client = await connect_client()
    conversation_id = (await say(alice, "one"))["conversation_id"]
    await tab.request(type="subscribe", conversation_id=conversation_id)
    provider.enqueue(Reply(text="slow " * 50, chunk_delay=0.05))
    await alice.send(type="send", conversation_id=conversation_id, content="two")
    await tab.until(lambda e: e["type"] == "delta")
    streaming = next(
        e["message"]
        for e in tab.seen
        if e["type"] == "message" and e["message"]["status"] == "streaming"
    )
    provider.enqueue(Reply(text="a fresh take"))
    ack = await tab.request(
        type="regenerate", conversation_id=conversation_id, message_id=streaming["id"]
    )
    assert ack["type"] == "ack"
    for someone in (alice, tab):
        events = await someone.until(
            lambda e: e["type"] == "message" and e["message"]["content"] == "a fresh take"
        )
        ended = [
            e["message"]["status"]
            for e in events
            if e["type"] == "message" and e["message"]["id"] == streaming["id"]
        ]
        assert ended[-1] == "cancelled"
        assert ended.count("cancelled") == 1
    path = await history(alice, conversation_id)
    assert contents(path)[2:] == ["two", "a fresh take"]
    assert path[3]["id"] == ack["message_id"]
    assert path[3]["sibling_ids"] == [streaming["id"], ack["message_id"]]
