"""How a reply streams through a loaded process: on SQLite only, since it is the loop that is
loaded, not the database."""

from __future__ import annotations

import asyncio
import time

from conftest import Client, deltas_text

from cortex.testing.fake_openai import FakeOpenAI, Reply

# Every test runs on the direct stream path and on LiteLLM's (conftest).
BOTH_LLM_PATHS = True


async def test_a_burst_on_a_busy_server_goes_out_in_joined_frames(
    client: Client, provider: FakeOpenAI
) -> None:
    """On a loop shared by many streams, every turn of the loop comes back late: a reply must
    still read its buffered chunks for a while before yielding, not send a frame per chunk."""
    words = " ".join(f"w{i}" for i in range(200))
    provider.enqueue(Reply(text=words))
    busy = True

    def other_streams_turn() -> None:
        time.sleep(0.06)  # holds the loop, as the turn of many other streams would

    async def other_streams() -> None:
        while busy:
            other_streams_turn()
            await asyncio.sleep(0)

    hog = asyncio.create_task(other_streams())
    try:
        await client.send(type="send", content="burst")
        events = await client.until_reply()
    finally:
        busy = False
        await hog
    assert deltas_text(events) == words
    frames = sum(e["type"] == "delta" for e in events)
    assert 1 < frames < 200 / 4, frames
