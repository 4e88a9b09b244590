"""Fixtures for real PostgreSQL and Redis servers, one each per test session.

They start lazily, only when a test asks for them, and fail (never skip) when the server is not
installed: a skipped scale-out test would hide that it never ran.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cortex.testing.services import PostgresServer, RedisServer


def _start_or_fail(server: PostgresServer | RedisServer) -> None:
    """Start a server, turning "not installed" into a test failure with the fix in it."""
    try:
        server.start()
    except RuntimeError as exc:
        message = str(exc)
    else:
        return
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session; tests get their own database in it."""
    server = PostgresServer()
    _start_or_fail(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database: tests never see each other's rows."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the whole session."""
    server = RedisServer()
    _start_or_fail(server)
    try:
        yield server
    finally:
        server.stop()
