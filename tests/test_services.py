"""The private PostgreSQL and Redis servers that scale-out tests run against."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from cortex.testing.services import PostgresServer, RedisServer


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes a plain libpq URL, without SQLAlchemy's driver suffix."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def test_postgres_fresh_database_answers(postgres_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(postgres_url))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables == 0
    finally:
        await conn.close()


async def test_postgres_databases_are_independent(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database("t_independent_a")
    second = postgres_server.create_database("t_independent_b")
    assert first != second
    conn_a = await asyncpg.connect(asyncpg_dsn(first))
    conn_b = await asyncpg.connect(asyncpg_dsn(second))
    try:
        await conn_a.execute("CREATE TABLE only_here (x int)")
        await conn_a.execute("INSERT INTO only_here VALUES (42)")
        assert await conn_a.fetchval("SELECT x FROM only_here") == 42
        assert await conn_b.fetchval("SELECT to_regclass('only_here') IS NULL") is True
        assert await conn_a.fetchval("SELECT current_database()") == "t_independent_a"
        assert await conn_b.fetchval("SELECT current_database()") == "t_independent_b"
    finally:
        await conn_a.close()
        await conn_b.close()


async def test_redis_ping_set_get(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()


async def test_redis_comes_back_after_kill(redis_server: RedisServer) -> None:
    port = redis_server.port
    client = aioredis.Redis.from_url(redis_server.url)
    await client.set("lost", "1")
    await client.aclose()

    redis_server.kill()
    assert not redis_server.running
    redis_server.start()
    assert redis_server.port == port

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping() is True
        assert await client.get("lost") is None  # no persistence: it came back empty
    finally:
        await client.aclose()
