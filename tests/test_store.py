"""The store's engine on a real SQLite file migrated by alembic."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import make_settings
from sqlalchemy import text

from cortex.store import make_engine, migrate


async def test_a_connection_given_back_mid_transaction_is_rolled_back(tmp_path: Path) -> None:
    # The pool skips its rollback after a commit (a round trip saved); a transaction still
    # open must be rolled back all the same, or the next borrower would inherit it.
    settings = make_settings(tmp_path)
    await asyncio.to_thread(migrate, settings.database_url)
    engine = make_engine(settings)
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            await raw.driver_connection.execute(
                "INSERT INTO conversations (id, owner, title, last_seq, answered_seq, "
                "created_at, updated_at) VALUES ('c1', 'u', 't', 0, 0, '2026-01-01', '2026-01-01')"
            )
            assert raw.driver_connection.in_transaction
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            assert not raw.driver_connection.in_transaction
            count = (await conn.execute(text("SELECT count(*) FROM conversations"))).scalar()
        assert count == 0
    finally:
        await engine.dispose()
