"""Where a store transaction runs: whole in a thread on SQLite, in SQLAlchemy's greenlet on
PostgreSQL. Queries are plain functions of a `Session`, the same for both.

Why: aiosqlite runs every cursor call in its thread and wakes the event loop for each result:
8 to 17 round trips per Cortex transaction, each costing the loop 0.15-0.3 ms of CPU on the
machines of bench/NOTEBOOK.md. Run whole in a thread, a transaction is one round trip, and the
loop stays free for the streams. asyncpg is natively async, so PostgreSQL keeps the async engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .engine import sqlite_thread_engine

T = TypeVar("T")

# SQLite has one writer at a time; a few threads let reads run beside it (WAL) without
# letting many Python threads contend for the GIL with the event loop.
SQLITE_THREADS = 4


class Transactions:
    """Runs `fn(session)` as one transaction: committed if it returns, rolled back if it raises.

    On SQLite a transaction that has started runs to its end even if its caller is cancelled.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._async_sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._sessions: sessionmaker[Session] | None = None
        self._threads: ThreadPoolExecutor | None = None
        if engine.dialect.name == "sqlite":
            self._sync_engine = sqlite_thread_engine(engine)
            self._sessions = sessionmaker(self._sync_engine, expire_on_commit=False)
            self._threads = ThreadPoolExecutor(SQLITE_THREADS, thread_name_prefix="cortex-db")

    async def run(self, fn: Callable[[Session], T]) -> T:
        if self._threads is None:
            async with self._async_sessions() as session, session.begin():
                return await session.run_sync(fn)
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._in_tx, fn)

    def _in_tx(self, fn: Callable[[Session], T]) -> T:
        assert self._sessions is not None
        with self._sessions() as session, session.begin():
            return fn(session)

    async def close(self) -> None:
        """Let running transactions finish, then close the threads and their connections."""
        if self._threads is not None:
            await asyncio.to_thread(self._threads.shutdown, wait=True)
            self._sync_engine.dispose()
