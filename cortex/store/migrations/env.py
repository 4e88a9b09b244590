"""Alembic environment: runs migrations on the async engine Cortex itself uses."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from cortex.config import Settings
from cortex.store.engine import refuse_unknown_revisions
from cortex.store.models import Base

target_metadata = Base.metadata
_LOCK_KEY = 0x636F72746578  # "cortex": the advisory lock that serialises migrations


def _url() -> str:
    return context.config.get_main_option("sqlalchemy.url") or Settings().database_url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    refuse_unknown_revisions(context.get_context().get_current_heads(), context.script)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several processes may start at once: one migrates, the others wait and then find
            # nothing left to do. The lock ends with the transaction.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
