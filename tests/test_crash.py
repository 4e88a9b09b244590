"""A real `cortex serve` process killed with SIGKILL mid-reply, then started again."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from conftest import TIMEOUT, Client, deltas_text, final_message
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cortex.testing.fake_openai import FakeOpenAI, Reply

LONG = " ".join(f"token{i}" for i in range(400))


@asynccontextmanager
async def cortex_process(
    tmp_path: Path, provider: FakeOpenAI
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    env = {
        **os.environ,
        "CORTEX_PORT": "0",
        "CORTEX_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}",
        "CORTEX_DEFAULT_MODEL": "openai/fake-model",
        "CORTEX_LLM_API_BASE": provider.base_url,
        "CORTEX_LLM_API_KEY": "sk-fake",
        "CORTEX_CHECKPOINT_MS": "50",
        "CORTEX_NUM_RETRIES": "0",
        "CORTEX_SHUTDOWN_GRACE_S": "0.2",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.cli",
        "serve",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT * 3):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "cortex serve exited before it was ready"
                found = re.search(r"http://([\d.]+):(\d+)/", line)
                if found:
                    break
        yield proc, f"ws://{found[1]}:{found[2]}/ws"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigkill_mid_reply_loses_no_acknowledged_message(
    tmp_path: Path, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text=LONG, chunk_delay=0.01), Reply(text="back again"))
    async with cortex_process(tmp_path, provider) as (proc, url):
        async with connect(url) as ws:
            client = Client(ws)
            await client.send(type="send", content="survive this", client_msg_id="k1")
            ack = (await client.until_type("ack"))[-1]
            conversation_id = ack["conversation_id"]
            # Wait until a checkpoint has surely been written (several intervals of text).
            await client.until(lambda e: e["type"] == "delta" and e["offset"] > 600)
            seen = deltas_text(client.seen)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    async with cortex_process(tmp_path, provider) as (proc, url), connect(url) as ws:
        client = Client(ws)
        page = await client.request(type="history", conversation_id=conversation_id)
        user, reply = page["messages"]
        assert (user["id"], user["content"], user["status"]) == (
            ack["message_id"],
            "survive this",
            "complete",
        )
        assert reply["status"] == "interrupted"
        assert reply["content"] and LONG.startswith(reply["content"])
        assert seen.startswith(reply["content"]) or reply["content"].startswith(seen)
        # The conversation carries on in the new process; a retried send is not doubled.
        await client.send(
            type="send", conversation_id=conversation_id, content="survive this", client_msg_id="k1"
        )
        assert (await client.until_type("ack"))[-1]["message_id"] == ack["message_id"]
        await client.send(type="send", conversation_id=conversation_id, content="hello?")
        assert final_message(await client.until_reply())["content"] == "back again"


async def test_sigterm_finishes_and_closes_with_1001(tmp_path: Path, provider: FakeOpenAI) -> None:
    provider.enqueue(Reply(text="short and sweet", chunk_delay=0.01))
    async with cortex_process(tmp_path, provider) as (proc, url):
        async with connect(url) as ws:
            client = Client(ws)
            await client.send(type="send", content="quick")
            await client.until_reply()
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(TIMEOUT):
                    await ws.wait_closed()
            except ConnectionClosed:
                pass
            assert ws.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
