"""Checkpoints of concurrent replies are written together, one transaction per batch."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import TIMEOUT, Client, final_message

from cortex.testing.fake_openai import FakeOpenAI, Reply

BOTH_BACKENDS = True
WORDS = " ".join(f"w{i}" for i in range(40))


async def test_concurrent_replies_checkpoint_in_shared_batches(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(checkpoint_ms=50)
    batches: list[int] = []
    write = app.store.checkpoint_texts

    async def counted(texts: list[tuple[str, str]]) -> None:
        batches.append(len(texts))
        await write(texts)

    app.store.checkpoint_texts = counted
    provider.default = Reply(text=WORDS, chunk_delay=0.02)
    clients: list[Client] = [await connect_to(app) for _ in range(5)]
    for client in clients:
        await client.send(type="send", content="go")
    acks = [(await client.until_type("ack"))[-1] for client in clients]
    ids = [ack["conversation_id"] for ack in acks]

    async def checkpointed() -> bool:
        """Every reply's row holds part of its text while it still streams."""
        for conversation_id in ids:
            rows, _ = await app.store.messages(conversation_id, limit=10)
            row = rows[-1]
            if not (row.role == "assistant" and row.status == "streaming" and row.content):
                return False
            assert WORDS.startswith(row.content)
        return True

    async with asyncio.timeout(TIMEOUT):
        while not await checkpointed():  # noqa: ASYNC110 - polls the database, no event says
            await asyncio.sleep(0.02)
    finals = [final_message(await client.until_reply()) for client in clients]
    assert [f["content"] for f in finals] == [WORDS] * 5
    assert max(batches) > 1, batches  # replies due together share one transaction
    for conversation_id in ids:  # the final write came after the last checkpoint
        rows, _ = await app.store.messages(conversation_id, limit=10)
        assert (rows[-1].status, rows[-1].content) == ("complete", WORDS)
