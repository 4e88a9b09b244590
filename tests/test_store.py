"""The store's transactions, on a real SQLite file and a real PostgreSQL, migrated by alembic."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_settings
from sqlalchemy.orm import Session

from cortex.store import Store, make_engine, migrate
from cortex.store.models import Conversation, utcnow

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
