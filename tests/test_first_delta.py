"""The first turn's model request starts while the reply's row commits (pipeline/early.py):
taken when the turn asks the same, else cancelled (its HTTP request closed) and made again.

SQLite only: the slow commit below sleeps in the transaction's thread, which on PostgreSQL is
the event loop itself.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Client, deltas_text, eventually, final_message

from cortex.pipeline.early import Opening
from cortex.pipeline.reply import Replies
from cortex.store import repo
from cortex.store.statements import ContextMessage, StoreError
from cortex.testing.fake_openai import FakeOpenAI, Reply

COMMIT_S = 0.3  # the transaction's work after the context is read: the request starts meanwhile


def slowed(fn: Any, ended: list[float], *, fail: bool) -> Any:
    """`fn`, then COMMIT_S more of its transaction (and a failure, if `fail`); `ended` gets
    when each call ended."""

    def slow(*args: Any, **kwargs: Any) -> Any:
        made = fn(*args, **kwargs)
        time.sleep(COMMIT_S)  # in the DB thread: the event loop runs on
        ended.append(time.monotonic())
        if fail:
            raise StoreError("the commit failed (test)")
        return made

    return slow


def slow_commit(monkeypatch: pytest.MonkeyPatch, *, fail: bool) -> list[float]:
    """Make `start_reply` take COMMIT_S after reading the context (and fail, if `fail`);
    returns when each such transaction ended."""
    ended: list[float] = []
    monkeypatch.setattr(repo, "open_turn", slowed(repo.open_turn, ended, fail=fail))  # type: ignore[attr-defined]
    return ended


async def request_closed(provider: FakeOpenAI) -> None:
    """The one request made reaches the provider, and is closed long before its first chunk
    (30 s away) was due."""
    await eventually(lambda: len(provider.requests) == 1)
    started = time.monotonic()
    await eventually(lambda: provider.active_requests == 0)
    assert time.monotonic() - started < 10


def answer_timed(provider: FakeOpenAI, text: str) -> list[float]:
    """The provider answers `text`; the list gets when each request reached it."""
    seen: list[float] = []

    def answer(body: dict[str, Any]) -> Reply:
        seen.append(time.monotonic())
        return Reply(text=text)

    provider.responder = answer
    return seen


def text_of(body: dict[str, Any]) -> str:
    return " ".join(str(m.get("content")) for m in body["messages"])


async def test_the_model_request_starts_before_the_row_commits_and_is_taken(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = slow_commit(monkeypatch, fail=False)
    seen = answer_timed(provider, "one two three")
    await client.send(type="send", content="hi")
    final = final_message(await client.until_reply())
    assert final["status"] == "complete" and final["content"] == "one two three"
    assert deltas_text(client.seen) == "one two three"
    # One request, and it reached the provider while the transaction was still running.
    assert len(provider.requests) == 1
    assert len(ended) == 1 and seen[0] < ended[0]


async def test_a_failed_commit_cancels_the_request_it_started(
    client: Client, provider: FakeOpenAI, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_commit(monkeypatch, fail=True)
    provider.enqueue(Reply(text="never shown", first_chunk_delay=30))
    await client.send(type="send", content="hi")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await request_closed(provider)
    assert not [e for e in client.seen if e["type"] == "delta"]
    rows, _ = await server.store.messages(conversation_id)
    assert [row.role for row in rows] == ["user"]  # acknowledged and kept; no reply row


async def test_a_request_that_differs_from_the_turn_s_is_cancelled_and_made_again(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_commit(monkeypatch, fail=False)
    start_early = Replies._start_early

    def stale(self: Replies, opening: Opening) -> Any:
        # As if the context had changed after the request was built: it no longer matches.
        old = ContextMessage(role="user", content="stale", tool_calls=None, tool_call_id=None)
        return start_early(self, opening._replace(context=[old, *opening.context]))

    monkeypatch.setattr(Replies, "_start_early", stale)

    def answer(body: dict[str, Any]) -> Reply:
        if "stale" in text_of(body):
            return Reply(text="stale answer", first_chunk_delay=30)
        return Reply(text="fresh answer")

    provider.responder = answer
    await client.send(type="send", content="hi")
    final = final_message(await client.until_reply())
    assert final["status"] == "complete" and final["content"] == "fresh answer"
    assert deltas_text(client.seen) == "fresh answer"
    assert ["stale" in text_of(body) for body in provider.requests] == [True, False]
    await eventually(lambda: provider.active_requests == 0)  # the stale one was closed


async def test_a_regeneration_s_request_also_starts_before_its_row_commits(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider.default = Reply(text="first answer")
    await client.send(type="send", content="hi")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    first = final_message(await client.until_reply())
    ended: list[float] = []
    update_row = repo.update_row  # type: ignore[attr-defined]

    def slow(session: Any, message_id: str, fields: dict[str, Any]) -> Any:
        done = update_row(session, message_id, fields)
        if fields.get("status") == "streaming":  # start_reply opening the queued row
            time.sleep(COMMIT_S)
            ended.append(time.monotonic())
        return done

    monkeypatch.setattr(repo, "update_row", slow)
    seen = answer_timed(provider, "second answer")
    provider.default = Reply(text="unused")
    ack = await client.request(
        type="regenerate", conversation_id=conversation_id, message_id=first["id"]
    )
    final = final_message(await client.until_reply())
    assert final["id"] == ack["message_id"] and final["content"] == "second answer"
    assert len(provider.requests) == 2  # the first reply's and the regeneration's, no more
    assert len(ended) == 1 and len(seen) == 1 and seen[0] < ended[0]


def slow_message_commit(monkeypatch: pytest.MonkeyPatch, *, fail: bool) -> list[float]:
    """Make `add_user_message`'s transaction take COMMIT_S after its work (and fail, if
    `fail`); returns when each such transaction ended."""
    from cortex.store.transactions import Transactions

    ended: list[float] = []
    original = Transactions._in_tx

    def slow(self: Transactions, fn: Any) -> Any:
        if "add_user_message" not in getattr(fn, "__qualname__", ""):
            return original(self, fn)

        return original(self, slowed(fn, ended, fail=fail))

    monkeypatch.setattr(Transactions, "_in_tx", slow)
    return ended


@pytest.mark.parametrize("new_conversation", [True, False])
async def test_a_message_nothing_waits_before_starts_its_request_before_it_commits(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, new_conversation: bool
) -> None:
    frame: dict[str, Any] = {}
    if not new_conversation:
        provider.enqueue(Reply(text="first answer"))
        await client.send(type="send", content="first")
        frame["conversation_id"] = (await client.until_type("ack"))[-1]["conversation_id"]
        await client.until_reply()
    ended = slow_message_commit(monkeypatch, fail=False)
    seen = answer_timed(provider, "early answer")
    await client.send(type="send", content="second", **frame)
    final = final_message(await client.until_reply())
    assert final["status"] == "complete" and final["content"] == "early answer"
    assert deltas_text([e for e in client.seen if e.get("message_id") == final["id"]]) == (
        "early answer"
    )
    # One request for the message, and it reached the provider before the message committed.
    assert len(seen) == 1 and len(ended) == 1 and seen[0] < ended[0]


async def test_a_failed_message_commit_closes_the_request_it_started(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_message_commit(monkeypatch, fail=True)
    provider.enqueue(Reply(text="never shown", first_chunk_delay=30))
    await client.send(type="send", content="hi", request_id="r1")
    error = (await client.until_type("error"))[-1]
    assert error["code"] == "internal" and error["request_id"] == "r1"
    await request_closed(provider)
    assert not [e for e in client.seen if e["type"] in ("ack", "delta")]


async def test_a_message_sent_during_a_reply_gets_one_request_after_it(
    client: Client, provider: FakeOpenAI
) -> None:
    """Queued behind a reply, a message's request is not started early: each message makes
    exactly one request, in order."""
    provider.enqueue(Reply(text="slow first answer", chunks=3, chunk_delay=0.2))
    provider.enqueue(Reply(text="second answer"))
    await client.send(type="send", content="first")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_type("delta")
    await client.send(type="send", content="second", conversation_id=conversation_id)
    await client.until(
        lambda e: e["type"] == "message" and e["message"]["content"] == "second answer"
    )
    assert [text_of(body).split()[-1] for body in provider.requests] == ["first", "second"]


async def test_a_reply_builds_its_first_turns_messages_once(
    client: Client, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The turn takes the messages of the request begun early (built from the same context for
    the same model): the history is put in OpenAI's format, and trimmed, once a reply."""
    from cortex.pipeline import reply

    built: list[int] = []
    original = reply.openai_messages

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(reply, "openai_messages", counted)
    provider.enqueue(Reply(text="first answer"), Reply(text="second answer"))
    await client.send(type="send", content="first")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    assert len(built) == 1
    await client.send(type="send", content="second", conversation_id=conversation_id)
    final = final_message(await client.until_reply())
    assert final["content"] == "second answer" and len(built) == 2
    assert len(provider.requests) == 2
