"""Random and mutated frames: the server answers each with a typed error or a clean close,
keeps answering `ping`, and the database stays intact."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from cortex.app import Cortex, running
from cortex.protocol import INBOUND_TYPES

ERROR_CODES = {
    "bad_json",
    "bad_frame",
    "unknown_type",
    "too_large",
    "not_found",
    "rate_limited",
    "internal",
}
# Every frame type the protocol declares (its registry), and two that are none.
TYPES = [*sorted(INBOUND_TYPES), "bogus", ""]


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cortex]:
    """A real server on its own event loop in a thread, so hypothesis can drive it from sync
    code. The mock model answers (no provider needed)."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    settings = make_settings(
        tmp,
        None,
        use_mock=True,
        rate_per_s=10_000,
        rate_burst=10_000,
        max_message_chars=2_000,
        max_frame_bytes=65_536,
    )
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        async with running(settings) as app:
            box["app"] = app
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    yield box["app"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(30)


# Text with lone UTF-16 surrogates too: JSON escapes them (`\ud83d`), and a browser's
# JSON.stringify of half an emoji sends exactly that.
surrogates = st.text(alphabet=st.characters(categories=["Cs", "L", "N", "So"]), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | surrogates,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
frames = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)},
    optional={
        "conversation_id": st.text(max_size=80) | st.integers() | st.none(),
        "content": st.text(max_size=2_500) | surrogates | json_values,
        "after_seq": st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=5),
        "before_seq": st.integers() | st.floats(allow_nan=False) | st.none(),
        "limit": st.integers(min_value=-5, max_value=1_000) | st.text(max_size=3),
        "request_id": st.text(max_size=200) | surrogates | st.integers(),
        "client_msg_id": st.text(max_size=200) | surrogates,
        "tools": st.lists(st.text(max_size=70), max_size=70) | json_values,
        "title": st.text(max_size=250) | surrogates,
        "extra": json_values,
    },
)
raw_frames = (
    frames.map(json.dumps)
    | st.text(max_size=300)
    | st.binary(max_size=300)
    | st.integers(min_value=1, max_value=5_000).map(lambda n: "[" * n + "]" * n)
    | st.integers(min_value=1, max_value=400).map(
        lambda n: '{"type":"ping","n":' + "9" * n * 20 + "}"
    )
)


def _answer(ws: ClientConnection) -> list[dict[str, Any]]:
    """Send a ping and collect everything up to its pong."""
    ws.send(json.dumps({"type": "ping", "request_id": "probe"}))
    events = []
    while True:
        event = json.loads(ws.recv(timeout=10))
        events.append(event)
        if event.get("request_id") == "probe" and event["type"] == "pong":
            return events


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(raw_frames, min_size=1, max_size=6))
def test_random_frames_never_break_the_server(
    threaded_server: Cortex, batch: list[str | bytes]
) -> None:
    with connect(threaded_server.url, max_size=None) as ws:
        try:
            for raw in batch:
                ws.send(raw)
            events = _answer(ws)
        except ConnectionClosed:
            assert ws.close_code in (1008, 1009, 1013), ws.close_code
            return
        for event in events:
            if event["type"] == "error":
                assert event["code"] in ERROR_CODES and event["message"]
            assert event["type"] in {
                "error",
                "pong",
                "ack",
                "message",
                "typing",
                "delta",
                "history",
                "conversations",
            }
    with connect(threaded_server.url) as probe:
        assert _answer(probe)[-1]["type"] == "pong"


# Requests as an attacker writes them: any method, odd paths (long, percent-escaped, dotted,
# NUL bytes), any query on the API's routes.
segments = st.sampled_from(
    ["", "api", "conversations", "messages", "export", "static", "js", "..", ".", "%2e%2e", "ws"]
) | st.text(alphabet=st.characters(codec="ascii", exclude_characters=" \r\n#?"), max_size=30)
paths = st.lists(segments, max_size=5).map(lambda parts: "/" + "/".join(parts)) | st.builds(
    lambda n: "/static/" + "a" * n, st.integers(min_value=200, max_value=6000)
)
queries = st.dictionaries(
    st.sampled_from(["limit", "before_seq", "before", "format", "access_token", "x"]),
    st.sampled_from(["", "-1", "0", "1", "9" * 25, "abc", "md", "json", "%00", "1e9"]),
    max_size=3,
).map(lambda q: "&".join(f"{k}={v}" for k, v in q.items()))
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])


def _http_status(port: int, method: str, target: str) -> int | None:
    """Write one raw request; the answer's status, or None if the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        first = sock.makefile("rb").readline()
    return int(first.split()[1]) if first.startswith(b"HTTP/1.1 ") else None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, query=queries)
def test_random_http_requests_get_an_answer_below_500(
    threaded_server: Cortex, method: str, path: str, query: str
) -> None:
    target = f"{path}?{query}" if query else path
    status = _http_status(threaded_server.port, method, target)
    assert status is not None and 200 <= status < 500, (method, target, status)


def test_database_is_intact_after_fuzzing(threaded_server: Cortex) -> None:
    async def check() -> None:
        from cortex.store import Store, make_engine

        engine = make_engine(threaded_server.settings)
        store = Store(engine)
        try:
            conversations, _ = await store.conversations(owner="local", limit=200)
            for conv in conversations:
                rows, _ = await store.messages(conv.id, limit=200)
                seqs = [r.seq for r in rows]
                assert seqs == sorted(set(seqs))
            async with engine.connect() as conn:
                from sqlalchemy import text

                assert (await conn.execute(text("PRAGMA integrity_check"))).scalar() == "ok"
        finally:
            await store.close()
            await engine.dispose()

    asyncio.run(check())
    with connect(threaded_server.url) as ws:
        assert _answer(ws)[-1]["type"] == "pong"
