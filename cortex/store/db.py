"""The engine (SQLite in WAL mode with a busy timeout) and alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def make_engine(settings: Settings) -> AsyncEngine:
    """One engine per process, built from settings (no import-time globals)."""
    url = settings.database_url
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        # Replies checkpoint beside their streams: room for many short transactions at once.
        kwargs.update(pool_pre_ping=True, pool_size=20, max_overflow=40, pool_timeout=60)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def sqlite_thread_engine(engine: AsyncEngine) -> Engine:
    """The same SQLite file through the plain `sqlite3` driver, for transactions run whole in
    a thread (`cortex.store.transactions`), with the same pragmas."""
    sync = create_engine(
        engine.url.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": 30, "check_same_thread": False},
    )
    event.listen(sync, "connect", _sqlite_pragmas)
    return sync


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; NORMAL sync is safe against process crashes
    # (kill -9), which is the promise; busy_timeout makes writers wait instead of failing.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Apply pending migrations (blocking; call it before the event loop or in a thread)."""
    command.upgrade(alembic_config(database_url), revision)
