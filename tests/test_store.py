"""The store's transactions, on a real SQLite file and a real PostgreSQL, migrated by alembic."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_settings
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cortex.store import Store, make_engine, migrate
from cortex.store.models import Conversation, Message, utcnow

BOTH_BACKENDS = True


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    await asyncio.to_thread(migrate, database_url)
    engine = make_engine(make_settings(tmp_path, database_url=database_url))
    store = Store(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


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


async def test_a_new_conversations_opening_turn_is_what_the_store_would_read(store: Store) -> None:
    """The router answers a new conversation's first message without reading its turn back:
    what it assumes must be exactly what `waiting_turn` reads."""
    stored = await store.add_user_message(
        owner="u",
        conversation_id=None,
        content="Hello there",
        client_msg_id="m1",
        system_prompt="be brief",
        reply_options={"model": "openai/fake", "temperature": 0.5},
        open_reply="openai/default",
    )
    assert stored is not None
    conv, message, created = stored.conversation, stored.message, stored.created
    assert created
    assumed = store.opening_turn(stored)
    read = await store.waiting_turn(conv.id)
    assert read is not None
    assert read.message.id == assumed.message.id == message.id
    assert read.message.reply_options == assumed.message.reply_options
    assert read.context == assumed.context
    assert read.reply is not None and assumed.reply is not None
    assert read.reply.id == assumed.reply.id
    for name in ("id", "owner", "system_prompt", "model", "temperature", "answered_seq"):
        assert getattr(read.conversation, name) == getattr(assumed.conversation, name), name


async def test_a_new_conversations_reply_row_is_stored_with_its_message(store: Store) -> None:
    """`open_reply` stores the reply's row in the message's transaction, at the next seq, and
    the conversation's counter agrees with both rows (the next message takes seq 3)."""
    stored = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id="m1", open_reply="openai/x"
    )
    assert stored is not None and stored.created and stored.reply is not None
    assert (stored.message.seq, stored.reply.seq) == (1, 2)
    assert stored.conversation.last_seq == 2
    page, _more = await store.messages(stored.conversation.id)
    assert [(m.id, m.role, m.status, m.model) for m in page] == [
        (stored.message.id, "user", "complete", None),
        (stored.reply.id, "assistant", "streaming", "openai/x"),
    ]
    assert store.opening_turn(stored).reply is stored.reply
    # A retry of the same send opens nothing more.
    again = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id="m1", open_reply="openai/x"
    )
    assert again is not None and not again.created and again.reply is None
    later = await store.add_user_message(
        owner="u", conversation_id=stored.conversation.id, content="next", client_msg_id=None
    )
    assert later is not None and later.message.seq == 3
    assert await store.count_messages(stored.conversation.id) == 3


async def test_a_follow_up_opens_its_reply_only_when_nothing_older_waits(store: Store) -> None:
    """A follow-up is stored with its reply's row, and its context read, in one transaction, but
    only when every older message is answered; the row is the one `waiting_turn` then reads."""
    first = await store.add_user_message(
        owner="u", conversation_id=None, content="one", client_msg_id=None, model="openai/a"
    )
    assert first is not None and first.reply is None
    conv_id = first.conversation.id
    # Message 1 still waits: message 2 must wait behind it, with no row of its own yet.
    second = await store.add_user_message(
        owner="u", conversation_id=conv_id, content="two", client_msg_id=None, open_reply="d"
    )
    assert second is not None and second.reply is None and second.context is None
    row = await store.add_message(conversation_id=conv_id, role="assistant", content="ans")
    await store.mark_answered(conv_id, 2)  # both answered (the reply covers them here)
    third = await store.add_user_message(
        owner="u", conversation_id=conv_id, content="three", client_msg_id=None, open_reply="d"
    )
    assert third is not None and third.reply is not None and third.context is not None
    assert (third.message.seq, third.reply.seq) == (4, 5)
    assert third.reply.model == "openai/a"  # the conversation's model, not the default
    assert [(c.role, c.content) for c in third.context] == [
        ("user", "one"),
        ("user", "two"),
        ("assistant", "ans"),
        ("user", "three"),
    ]
    assert row.seq == 3
    read = await store.waiting_turn(conv_id)
    assert read is not None and read.message.id == third.message.id
    assert read.reply is not None and read.reply.id == third.reply.id
    assert read.context == third.context
    opened = store.opening_turn(third)
    assert (opened.message.id, opened.context) == (read.message.id, read.context)
    assert opened.reply is third.reply and opened.conversation.last_seq == 5


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
