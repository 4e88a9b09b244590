"""The engine (SQLite in WAL mode with a busy timeout) and alembic migrations."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .. import __version__
from ..config import Settings
from ..errors import DatabaseTooNew, StartupError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's scripts are package data: `cortex migrate` works from a wheel, anywhere."""


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
    """Apply pending migrations (blocking; call it before the event loop or in a thread).

    Raises `StartupError` for a SQLite file Cortex cannot create or write, and
    `DatabaseTooNew` (from `migrations/env.py`) for a database a newer Cortex migrated.
    """
    check_sqlite_location(database_url)
    command.upgrade(alembic_config(database_url), revision)


def check_sqlite_location(database_url: str) -> None:
    """Refuse, in one line that names the path and the setting, a SQLite file that cannot be
    created or written, before SQLite's own "unable to open database file" says less; create
    a new one readable by its owner only (0600)."""
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise StartupError(f"CORTEX_DATABASE_URL is not a database URL: {exc}") from exc
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database or "").absolute()
    folder = path.parent
    if not folder.exists():
        problem = f"the folder {folder} does not exist"
    elif not folder.is_dir():
        problem = f"{folder} is not a folder"
    elif not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        problem = f"cannot create {path.name} in {folder} (permission denied)"
    elif path.exists() and (path.is_dir() or not os.access(path, os.R_OK | os.W_OK)):
        problem = f"cannot read and write {path}"
    else:
        if not path.exists():
            # Conversations and token hashes are nobody else's: the file is the owner's only,
            # and SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        return
    raise StartupError(f"CORTEX_DATABASE_URL: {problem}")


def refuse_unknown_revisions(current: Iterable[str], script: ScriptDirectory) -> None:
    """Stop before alembic reads a revision this Cortex lacks: a newer Cortex migrated it.

    Downgrading Cortex over a newer schema would run old code on new tables, so it refuses.
    """
    for revision in current:
        try:
            script.get_revision(revision)
        except CommandError:
            newest = ", ".join(script.get_heads())
            raise DatabaseTooNew(
                f"the database is at revision {revision}, which Cortex {__version__} does not "
                f"know (it knows up to {newest}): a newer Cortex migrated it. Run that "
                "version, or point CORTEX_DATABASE_URL at another database."
            ) from None
