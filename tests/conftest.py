"""Fixtures: a fake OpenAI-compatible provider, a real Cortex server on a free port, clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from cortex.app import Cortex, running
from cortex.config import Settings
from cortex.store import Store, make_engine, migrate
from cortex.testing.deltas import join_deltas
from cortex.testing.fake_openai import FakeOpenAI

pytest_plugins = ["services_fixtures"]

# One factor scales every wait, as in websockets' own tests: raise it on a slow machine.
TIMEOUT = 10.0 * float(os.environ.get("CORTEX_TEST_TIMEOUT_FACTOR", "1"))


def make_settings(tmp_path: Path, provider: FakeOpenAI | None = None, **overrides: Any) -> Settings:
    """Settings for a test server: a fresh SQLite file, port 0, the fake provider."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'cortex.db'}",
        "num_retries": 0,
        "checkpoint_ms": 50,
        "stream_idle_timeout": 5.0,
        "shutdown_grace_s": 2.0,
    }
    if provider is not None:
        values.update(
            default_model="openai/fake-model", llm_api_base=provider.base_url, llm_api_key="sk-fake"
        )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated database (SQLite, or PostgreSQL in `BOTH_BACKENDS` modules) and its Store."""
    await asyncio.to_thread(migrate, database_url)
    engine = make_engine(make_settings(tmp_path, database_url=database_url))
    store = Store(engine)
    try:
        yield store
    finally:
        await store.close()
        await engine.dispose()


@pytest.fixture
async def provider() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules that set `BOTH_BACKENDS = True` run every test on SQLite and on PostgreSQL;
    modules that set `BOTH_LLM_PATHS = True` run every test on the direct and LiteLLM paths."""
    if "database_url" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_BACKENDS", False):
        metafunc.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
    if getattr(metafunc.module, "BOTH_LLM_PATHS", False):
        metafunc.parametrize("llm_path", ["direct", "litellm"], indirect=True)


@pytest.fixture(autouse=True)
def llm_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The stream path every `Settings` of the test takes (`CORTEX_LLM_FAST_PATH`)."""
    path: str = getattr(request, "param", "direct")
    monkeypatch.setenv("CORTEX_LLM_FAST_PATH", "1" if path == "direct" else "0")
    return path


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a new database on the session's PostgreSQL."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'cortex.db'}"


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOpenAI, database_url: str) -> Settings:
    return make_settings(tmp_path, provider, database_url=database_url)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Cortex]:
    async with running(settings) as app:
        yield app


@pytest.fixture
async def start_server(
    tmp_path: Path, provider: FakeOpenAI, database_url: str
) -> AsyncIterator[Callable[..., Any]]:
    """Start a server with settings overrides: `app = await start_server(rate_burst=5)`."""
    async with contextlib.AsyncExitStack() as stack:

        async def _start(**overrides: Any) -> Cortex:
            overrides.setdefault("database_url", database_url)
            settings = make_settings(tmp_path, provider, **overrides)
            return await stack.enter_async_context(running(settings))

        yield _start


class Client:
    """A real `websockets` client with helpers to wait for events (never sleeps)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        event: dict[str, Any] = json.loads(raw)
        self.seen.append(event)
        return event

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """Every event up to and including the first one that matches."""
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                events.append(event)
                if predicate(event):
                    return events

    async def until_type(self, kind: str, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        return await self.until(lambda e: e["type"] == kind, timeout)

    async def until_reply(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Events up to typing off, which ends every reply."""
        return await self.until(lambda e: e["type"] == "typing" and not e["active"], timeout)

    async def request(self, **frame: Any) -> dict[str, Any]:
        """Send a frame with a request_id and return the direct answer to it."""
        rid = frame.setdefault("request_id", f"r{id(frame)}")
        await self.send(**frame)
        events = await self.until(lambda e: e.get("request_id") == rid)
        return events[-1]


@pytest.fixture
async def connect_to() -> AsyncIterator[Callable[..., Any]]:
    """Connect a client to a given server; every client is closed after the test."""
    clients: list[ClientConnection] = []

    async def _connect(app: Cortex, **kwargs: Any) -> Client:
        ws = await connect(app.url, **kwargs)
        clients.append(ws)
        return Client(ws)

    yield _connect
    for ws in clients:
        await ws.close()


@pytest.fixture
def connect_client(server: Cortex, connect_to: Callable[..., Any]) -> Callable[..., Any]:
    """Connect a client to the default `server` fixture."""

    async def _connect(**kwargs: Any) -> Client:
        result: Client = await connect_to(server, **kwargs)
        return result

    return _connect


@pytest.fixture
async def client(connect_client: Callable[..., Any]) -> Client:
    result: Client = await connect_client()
    return result


@pytest.fixture
async def http(server: Cortex) -> AsyncIterator[Callable[..., Any]]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:

        async def get(path: str, **kwargs: Any) -> tuple[int, Any]:
            async with session.get(path, **kwargs) as response:
                body = await response.read()
                ctype = response.headers.get("Content-Type", "")
                return response.status, json.loads(body) if "json" in ctype else body

        yield get


async def eventually(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Wait until `predicate()` is true: for server-side state no event announces."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls state, not a stand-in for an event
            await asyncio.sleep(0.02)


def final_message(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The last stored assistant message among the events."""
    messages = [
        e["message"]
        for e in events
        if e["type"] == "message"
        and e["message"]["role"] == "assistant"
        and e["message"]["status"] != "streaming"
    ]
    assert messages, f"no final assistant message in {[e['type'] for e in events]}"
    return messages[-1]


def deltas_text(events: list[dict[str, Any]]) -> str:
    """Concatenate deltas, checking that every offset continues the text exactly."""
    text, problem = join_deltas((e["offset"], e["text"]) for e in events if e["type"] == "delta")
    assert not problem, problem
    return text
