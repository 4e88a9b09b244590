"""A real `cortex serve` process killed with SIGKILL mid-reply, then started again."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from conftest import TIMEOUT, Client, deltas_text, final_message
from processes import cortex_process as serve_process
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from cortex.testing.fake_openai import FakeOpenAI, Reply

LONG = " ".join(f"token{i}" for i in range(400))


def cortex_process(
    tmp_path: Path, provider: FakeOpenAI
) -> AbstractAsyncContextManager[tuple[asyncio.subprocess.Process, str]]:
    return serve_process(tmp_path, provider, f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}")


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
