"""Operating Cortex: metrics after real exchanges, the log lines of an exchange, the banner."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, Client
from processes import cortex_process
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from cortex.app import Cortex
from cortex.banner import banner, safe_url
from cortex.config import Settings
from cortex.ops.logs import FIELDS, event, make_handler
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

MODEL = "openai/fake-model"
ALICE = "alice-" + "A1" * 20

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(app: Cortex, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.port}/metrics", headers=headers) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def exchange(client: Client, content: str, **extra: Any) -> tuple[str, list[dict[str, Any]]]:
    await client.send(type="send", content=content, **extra)
    conversation_id: str = (await client.until_type("ack"))[-1]["conversation_id"]
    return conversation_id, await client.until_reply()


async def test_metrics_follow_a_real_exchange(
    client: Client, provider: FakeOpenAI, server: Cortex
) -> None:
    status, content_type, text = await scrape(server)
    assert status == 200 and content_type.startswith("text/plain")
    before = parse(text)
    assert value(before, "cortex_build_info", version="0.1.0") == 1
    assert value(before, "cortex_connections_open") == 1

    provider.enqueue(Reply(text="one two three four", chunks=4))
    conversation_id, _ = await exchange(client, "count to four", request_id="m1")
    assert (await client.request(type="ping"))["type"] == "pong"
    after = parse((await scrape(server))[2])

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("cortex_frames_in_total", type="send") == 1
    assert grew("cortex_frames_in_total", type="ping") == 1
    # Four deltas, or fewer frames when the writer merged consecutive ones (a lagging socket).
    assert 1 <= grew("cortex_frames_out_total", type="delta") <= 4
    assert grew("cortex_frames_out_total", type="ack") == 1
    assert grew("cortex_frames_out_total", type="typing") == 2
    assert grew("cortex_frames_out_total", type="message") == 3  # user, streaming, final
    assert grew("cortex_replies_total", model=MODEL, status="complete") == 1
    assert grew("cortex_reply_first_token_seconds_count", model=MODEL) == 1
    assert grew("cortex_reply_duration_seconds_count", model=MODEL) == 1
    first = value(after, "cortex_reply_first_token_seconds_sum", model=MODEL)
    assert 0 < first <= value(after, "cortex_reply_duration_seconds_sum", model=MODEL)
    assert grew("cortex_tokens_total", model=MODEL, kind="completion") == 4
    assert grew("cortex_tokens_total", model=MODEL, kind="prompt") > 0
    assert grew("cortex_db_operation_seconds_count", operation="add_user_message") == 1
    # The final state is stored once per turn (checkpoints only when a reply outlasts their
    # interval, so their count depends on timing).
    assert grew("cortex_db_operation_seconds_count", operation="finish_message") == 1
    assert value(after, "cortex_subscriptions") == 1
    assert value(after, "cortex_replies_in_progress") == 0

    # A provider failure, then a reply that calls a tool.
    provider.enqueue(
        Reply(status=500),
        Reply(text="", tool_calls=[ToolCallSpec("calculator", '{"expression": "6 * 7"}')]),
        Reply(text="It is 42."),
    )
    await exchange(client, "fail please", conversation_id=conversation_id)
    await exchange(client, "what is 6 * 7?", conversation_id=conversation_id)
    final = parse((await scrape(server))[2])
    assert value(final, "cortex_provider_errors_total", model=MODEL, code="provider_error") == 1
    assert value(final, "cortex_replies_total", model=MODEL, status="error") == 1
    assert value(final, "cortex_replies_total", model=MODEL, status="complete") == 2
    assert value(final, "cortex_tool_calls_total", tool="calculator", outcome="ok") == 1
    assert value(final, "cortex_tool_call_seconds_count", tool="calculator") == 1
    assert value(final, "cortex_frames_out_total", type="tool_call") == 1
    assert value(final, "cortex_frames_out_total", type="error") == 1


async def test_metrics_access(start_server: Any) -> None:
    secured = await start_server(auth_tokens=f"{ALICE}:alice")
    assert (await scrape(secured))[0] == 401
    assert (await scrape(secured, {"Authorization": f"Bearer {ALICE}"}))[0] == 200

    scraper = "scrape-" + "S" * 32
    dedicated = await start_server(auth_tokens=f"{ALICE}:alice", metrics_token=scraper)
    assert (await scrape(dedicated, {"Authorization": f"Bearer {ALICE}"}))[0] == 401
    assert (await scrape(dedicated, {"Authorization": f"Bearer {scraper}"}))[0] == 200

    public = await start_server(auth_tokens=f"{ALICE}:alice", metrics_public=True)
    assert (await scrape(public))[0] == 200


@contextmanager
def captured(settings: Settings) -> Iterator[io.StringIO]:
    """Cortex's log handler (formatter, context, scrubbing) on the root logger, to a buffer."""
    stream = io.StringIO()
    handler = make_handler(settings, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if settings.log_level == "DEBUG" else logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_exchange_log_lines_have_their_fields_and_no_content(
    server: Cortex, client: Client, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text="the secret answer", chunks=3))
    with captured(server.settings.model_copy(update={"log_format": "json"})) as stream:
        conversation_id, _ = await exchange(client, "my secret question", request_id="rq-7")
    text = stream.getvalue()
    assert "secret" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    message = next(line for line in lines if line.get("event") == "message")
    assert message["conv"] == conversation_id and message["req"] == "rq-7"
    assert message["chars"] == len("my secret question") and message["seq"] == 1
    reply = next(line for line in lines if line.get("event") == "reply")
    assert reply["level"] == "info" and reply["logger"] == "cortex.reply"
    assert reply["conv"] == conversation_id and reply["req"] == "rq-7"
    assert isinstance(reply["conn"], int) and reply["conn"] == message["conn"]
    assert reply["model"] == MODEL and reply["status"] == "complete" and reply["seq"] == 1
    assert 0 < reply["ttft_ms"] <= reply["duration_ms"]
    assert reply["tokens_in"] > 0 and reply["tokens_out"] == 3 and reply["chars"] == 17
    assert "text" not in reply and "text" not in message


async def test_log_content_puts_the_text_in_the_log_lines(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(log_content=True)
    client: Client = await connect_to(app)
    provider.enqueue(Reply(text="the open answer"))
    # Connection lines are logged at DEBUG.
    with captured(app.settings.model_copy(update={"log_level": "DEBUG"})) as stream:
        await exchange(client, "an open question", request_id="rq-8")
        await client.ws.close()
        await client.ws.wait_closed()
        await client_gone(app)
    lines = stream.getvalue().splitlines()
    reply = next(line for line in lines if " cortex.reply reply " in line)
    assert 'text="the open answer"' in reply and "req=rq-8" in reply and "status=complete" in reply
    message = next(line for line in lines if " cortex.message message " in line)
    assert 'text="an open question"' in message
    closed = next(line for line in lines if " connection close " in line)
    assert "frames_in=1" in closed and "code=1000" in closed and "req=" not in closed


async def client_gone(app: Cortex) -> None:
    from conftest import eventually

    await eventually(lambda: not app.connections)


def test_tokens_are_scrubbed_from_event_fields(tmp_path: Any) -> None:
    settings = Settings(_env_file=None, log_format="json")  # type: ignore[call-arg]
    with captured(settings) as stream:
        event(logging.getLogger("cortex.test"), "probe", text=f"Authorization: Bearer {ALICE}")
    line = json.loads(stream.getvalue())
    assert ALICE not in stream.getvalue() and "[redacted]" in line["text"]


def test_event_keeps_fields_on_the_record() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("cortex.test.fields")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    event(logger, "thing", a=1, b=None)
    assert getattr(records[0], FIELDS) == {"a": 1}


async def test_banner_says_what_runs_and_hides_the_password(server: Cortex) -> None:
    lines = "\n".join(banner(server))
    assert "Cortex 0.1.0" in lines and f"127.0.0.1:{server.port}" in lines
    assert "openai/fake-model" in lines and "auth      off" in lines
    assert "metrics" in lines and "sqlite+aiosqlite" in lines
    assert "loop      asyncio" in lines  # pytest's loop; `cortex serve` picks uvloop (below)
    hidden = safe_url("postgresql+asyncpg://cortex:s3cret@db.internal:5432/cortex")
    assert hidden == "postgresql+asyncpg://cortex:***@db.internal:5432/cortex"


@pytest.mark.parametrize("setting, loop", [("true", "uvloop"), ("false", "asyncio")])
async def test_serve_runs_on_uvloop_unless_turned_off(
    tmp_path: Path, provider: FakeOpenAI, setting: str, loop: str
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cortex.db'}"
    async with cortex_process(tmp_path, provider, database_url, uvloop=setting) as (proc, url):
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while not (line := (await proc.stdout.readline()).decode()).startswith("  loop"):
                assert line, "the banner ended without its loop line"
        assert line.split() == ["loop", loop]
        async with connect(url) as ws:  # and it serves
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv())["type"] == "pong"
