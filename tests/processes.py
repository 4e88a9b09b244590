"""Real `cortex serve` processes for tests: started with env settings, killed afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from conftest import TIMEOUT

from cortex.testing.fake_openai import FakeOpenAI
from cortex.testing.processes import start_cortex

# What every test process runs with, unless the test says otherwise.
TEST_SETTINGS = {
    "checkpoint_ms": "50",
    "num_retries": "0",
    "shutdown_grace_s": "0.2",
}


@asynccontextmanager
async def cortex_process(
    cwd: Path, provider: FakeOpenAI, database_url: str, **settings: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Yield (process, ws url) of a `cortex serve` on a free port; `settings` are CORTEX_*.

    Its stderr goes to a new cortex-*.log in `cwd`; its stdout after the ready line is left
    for the test to read. It is killed (SIGKILL) afterwards if it is still running.
    """
    server = await start_cortex(
        cwd,
        api_base=provider.base_url,
        database_url=database_url,
        model="openai/fake-model",
        settings={
            f"CORTEX_{name.upper()}": value for name, value in {**TEST_SETTINGS, **settings}.items()
        },
        timeout=TIMEOUT * 3,
    )
    try:
        yield server.proc, server.url
    finally:
        await server.kill()
