"""Cortex as a user installs it: a wheel in a fresh venv outside the checkout.

The wheel is built from this checkout and installed with the lock's versions into a venv in a
temporary directory. Its `cortex` is then run from another unrelated directory, so nothing can
come from the checkout: migrations, the page and the mock model must all be in the package.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import TIMEOUT
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"

pytestmark = pytest.mark.slow


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ folder of a fresh venv with the wheel and its locked dependencies."""
    base = tmp_path_factory.mktemp("installed")
    wheels = base / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--build-constraint",
        LOCK,
        "--wheel-dir",
        wheels,
        ROOT,
        cwd=base,
    )
    (wheel,) = wheels.glob("cortex_chat-*.whl")
    venv = base / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=base)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "-c", LOCK, wheel, cwd=base)
    yield venv / "bin"


@pytest.fixture
def elsewhere(tmp_path: Path) -> dict[str, str]:
    """An environment for the installed `cortex`: a database in an empty folder, no keys."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CORTEX_", "LLM_", "OPENAI_", "ANTHROPIC_", "PYTHON"))
    }
    env["CORTEX_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    return env


def test_the_wheel_carries_the_page_and_migrations(installed: Path) -> None:
    names = run(
        installed / "python",
        "-c",
        "import cortex, pathlib; root = pathlib.Path(cortex.__file__).parent;"
        "print('\\n'.join(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()))",
        cwd=installed,
    ).split()
    assert "static/index.html" in names and "static/js/main.js" in names
    assert "static/vendor/SHA256SUMS" in names and any(n.endswith(".mjs") for n in names)
    assert "store/migrations/env.py" in names
    assert any(re.fullmatch(r"store/migrations/versions/0001_\w+\.py", n) for n in names)
    assert str(ROOT) not in run(
        installed / "python", "-c", "import cortex; print(cortex.__file__)", cwd=installed
    )


def test_version_help_and_migrate_from_anywhere(
    installed: Path, elsewhere: dict[str, str], tmp_path: Path
) -> None:
    version = run(installed / "cortex", "--version", cwd=tmp_path, env=elsewhere)
    assert (
        version.strip()
        == run(
            installed / "python", "-m", "cortex", "--version", cwd=tmp_path, env=elsewhere
        ).strip()
    )
    assert version.startswith("cortex ")
    assert "serve" in run(installed / "cortex", "--help", cwd=tmp_path, env=elsewhere)
    out = run(installed / "cortex", "migrate", cwd=tmp_path, env=elsewhere)
    assert "newest revision" in out and (tmp_path / "fresh.db").is_file()
    report = run(installed / "cortex", "doctor", "--no-model", cwd=tmp_path, env=elsewhere)
    assert "ok    migrations" in report


@pytest.fixture
async def served(installed: Path, elsewhere: dict[str, str], tmp_path: Path) -> AsyncIterator[str]:
    """`cortex serve` of the installed package on a free port; yields http://host:port."""
    proc = await asyncio.create_subprocess_exec(
        installed / "cortex",
        "serve",
        "--port",
        "0",
        cwd=tmp_path,
        env=elsewhere,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT * 3):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "the installed cortex serve exited before it was ready"
                found = re.search(r"Cortex is running: open (http://[\d.]+:\d+)/", line)
                if found:
                    break
        yield found[1]
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def test_installed_server_serves_page_health_and_a_reply(served: str) -> None:
    async with aiohttp.ClientSession(served) as session:
        async with session.get("/") as page:
            assert page.status == 200 and "<title>" in await page.text()
        async with session.get("/static/js/main.js") as script:
            assert script.status == 200
        async with session.get("/healthz") as health:
            assert health.status == 200
    async with connect(served.replace("http", "ws", 1) + "/ws") as ws:
        await ws.send(json.dumps({"type": "send", "content": "hello wheel", "client_msg_id": "w1"}))
        async with asyncio.timeout(TIMEOUT):
            while True:
                event = json.loads(await ws.recv())
                message = event.get("message", {})
                if message.get("role") == "assistant" and message["status"] == "complete":
                    break
    assert "hello wheel" in message["content"] and "mock" in message["content"]
