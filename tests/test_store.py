"""The store's transactions, on a real SQLite file and a real PostgreSQL, migrated by alembic."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cortex.store import Store
from cortex.store.models import Conversation, Message, utcnow

BOTH_BACKENDS = True


def _conversation(conversation_id: str) -> Conversation:
    now = utcnow()
    return Conversation(
        id=conversation_id,
        owner="u",
        title="t",
        last_seq=0,
        answered_seq=0,
        created_at=now,
        updated_at=now,
    )


async def test_a_transaction_that_raises_stores_nothing(store: Store) -> None:
    def add_then_fail(session: Session) -> None:
        session.add(_conversation("c1"))
        session.flush()  # the row is written inside the transaction...
        raise RuntimeError("...and the transaction fails after it")

    with pytest.raises(RuntimeError):
        await store._run(add_then_fail)
    assert await store.get_conversation_any("c1") is None

    def add(session: Session) -> None:
        session.add(_conversation("c2"))

    await store._run(add)
    assert await store.get_conversation_any("c2") is not None


async def test_sqlite_transactions_leave_the_event_loop_thread(store: Store) -> None:
    # aiosqlite would wake the loop for every cursor call; a whole transaction in a thread
    # wakes it once. On PostgreSQL asyncpg is async, so the loop's thread runs them.
    loop_thread = threading.get_ident()
    ran_in = await store._run(lambda _session: threading.get_ident())
    if store.engine.dialect.name == "sqlite":
        assert ran_in != loop_thread
    else:
        assert ran_in == loop_thread


async def test_start_reply_opens_the_oldest_waiting_message_with_its_context(
    store: Store,
) -> None:
    """`start_reply` reads the oldest unanswered message, its context (nothing queued after
    it), and stores the reply's row at the next seq, with the message's or conversation's
    model; `open_turn` does the same for a later turn of that reply."""
    first = await store.add_user_message(
        owner="u", conversation_id=None, content="one", client_msg_id=None, model="openai/a"
    )
    assert first is not None
    conv_id = first.conversation.id
    second = await store.add_user_message(
        owner="u",
        conversation_id=conv_id,
        content="two",
        client_msg_id=None,
        reply_options={"model": "openai/b"},
    )
    assert second is not None and second.message.seq == 2
    started = await store.start_reply(conv_id, default_model="openai/default")
    assert started is not None and started.message.id == first.message.id
    assert [(m.role, m.content) for m in started.context] == [("user", "one")]
    assert (started.row.seq, started.row.status, started.row.model) == (3, "streaming", "openai/a")
    await store.finish_message(started.row.id, content="ok", status="complete")
    await store.mark_answered(conv_id, 1)
    again = await store.start_reply(conv_id, default_model="openai/default")
    assert again is not None and again.message.id == second.message.id
    # A queued message follows the reply it waited for: the path, not seq order.
    assert [m.content for m in again.context] == ["one", "ok", "two"]
    assert again.row.model == "openai/b"  # what the send asked for
    context, row = await store.open_turn(conv_id, parent_id=second.message.id, model="openai/b")
    assert [m.content for m in context] == ["one", "ok", "two"]  # not the streaming row
    assert row.seq == again.row.seq + 1
    await store.mark_answered(conv_id, 2)
    assert await store.start_reply(conv_id, default_model="openai/default") is None


async def test_rows_handed_out_match_the_stored_rows(store: Store) -> None:
    """Rows are inserted with prebuilt statements and handed out as built: they must read back
    the same, with unset columns stored as SQL NULL."""
    stored = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id=None
    )
    assert stored is not None
    conv = stored.conversation
    row = await store.add_message(
        conversation_id=conv.id, role="assistant", content="", status="streaming", model="m"
    )
    assert row.seq == 2
    page, _more = await store.messages(conv.id)
    back = page[-1]
    for name in ("id", "seq", "role", "content", "status", "model", "tool_calls", "reply_options"):
        assert getattr(back, name) == getattr(row, name), name
    sql_null = select(func.count()).where(
        Message.id == row.id, Message.tool_calls.is_(None), Message.reply_options.is_(None)
    )
    assert await store._run(lambda session: session.scalar(sql_null)) == 1
    await store.finish_message(row.id, content="done", status="complete", finish_reason="stop")
    assert (await store.count_messages(conv.id)) == 2
