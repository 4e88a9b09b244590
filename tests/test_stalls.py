"""The stall timer counts the provider's silence, not the time the event loop was busy.

The provider runs in a thread with its own loop, so it goes on sending while the server's loop
(this test's) is held by a long callback, as on an overloaded process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from conftest import Client, final_message, make_settings
from websockets.asyncio.client import connect

from cortex.app import running
from cortex.testing.fake_openai import FakeOpenAI, Reply

# Every test runs on the direct stream path and on LiteLLM's (conftest).
BOTH_LLM_PATHS = True

Runner = Callable[[Coroutine[Any, Any, list[Any]]], list[Any]]
# Both loops: `cortex serve` runs on uvloop, whose timers run before it polls the sockets.
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
WORDS = " ".join(f"w{i}" for i in range(10))
GAP_S = 0.2  # between chunks: inside the stall timeout, well past a sleep(0.1)


@contextlib.contextmanager
def provider_in_a_thread(reply: Reply) -> Iterator[FakeOpenAI]:
    """A fake provider serving `reply` from a thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-provider", daemon=True)
    thread.start()
    provider = FakeOpenAI(default=reply)
    asyncio.run_coroutine_threadsafe(provider.start(), loop).result(10)
    try:
        yield provider
    finally:
        asyncio.run_coroutine_threadsafe(provider.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _reply_after_a_busy_loop(tmp_path: Path, reply: Reply) -> list[Any]:
    """Start a reply, hold the loop for 1.2 s once it waits for its second chunk (the stall
    timeout, 0.5 s, passes meanwhile), and return its events."""
    with provider_in_a_thread(reply) as provider:
        settings = make_settings(tmp_path, provider, stream_idle_timeout=0.5)
        async with running(settings) as app, connect(app.url) as ws:
            client = Client(ws)
            await client.send(type="send", content="go")
            events = await client.until_type("delta")
            await asyncio.sleep(GAP_S / 2)  # the stream now waits for the provider
            time.sleep(1.2)  # noqa: ASYNC251 - the point: a callback holds the loop
            events += await client.until_reply()
            return events


@LOOPS
def test_chunks_that_came_while_the_loop_was_busy_are_not_a_stall(
    tmp_path: Path, run: Runner
) -> None:
    events = run(_reply_after_a_busy_loop(tmp_path, Reply(WORDS, chunk_delay=GAP_S)))
    assert [e for e in events if e["type"] == "error"] == []
    final = final_message(events)
    assert final["status"] == "complete" and final["content"] == WORDS


@LOOPS
def test_a_provider_silent_past_the_timeout_is_a_stall_even_after_a_busy_loop(
    tmp_path: Path, run: Runner
) -> None:
    reply = Reply(WORDS, chunk_delay=GAP_S, stall_after=3)
    events = run(_reply_after_a_busy_loop(tmp_path, reply))
    assert [e["code"] for e in events if e["type"] == "error"] == ["provider_timeout"]
    final = final_message(events)
    assert final["status"] == "error" and final["error_code"] == "provider_timeout"
    assert final["content"] == "w0 w1 w2 "
