"""Real `cortex serve` processes for tests: started with env settings, killed afterwards."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from conftest import TIMEOUT

from cortex.testing.fake_openai import FakeOpenAI


@asynccontextmanager
async def cortex_process(
    cwd: Path, provider: FakeOpenAI, database_url: str, **settings: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Yield (process, ws url) of a `cortex serve` on a free port; `settings` are CORTEX_*."""
    env = {
        **os.environ,
        "CORTEX_PORT": "0",
        "CORTEX_DATABASE_URL": database_url,
        "CORTEX_DEFAULT_MODEL": "openai/fake-model",
        "CORTEX_LLM_API_BASE": provider.base_url,
        "CORTEX_LLM_API_KEY": "sk-fake",
        "CORTEX_CHECKPOINT_MS": "50",
        "CORTEX_NUM_RETRIES": "0",
        "CORTEX_SHUTDOWN_GRACE_S": "0.2",
        **{f"CORTEX_{name.upper()}": value for name, value in settings.items()},
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.cli",
        "serve",
        env=env,
        cwd=cwd,
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
