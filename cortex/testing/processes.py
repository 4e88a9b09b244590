"""Child processes for tests and benchmarks: `cortex serve` on a free port, and its kin.

One launcher for every real server process the tests and the bench scripts start::

    server = await start_cortex(workdir, api_base=fake.base_url)  # waits for its ready line
    server.url                                   # ws://127.0.0.1:PORT/ws
    await server.stop()                          # SIGTERM, then SIGKILL after a timeout

A child is started with a clean environment (no CORTEX_*, LLM_* or OpenAI setting of the
caller's shell) plus the settings asked for, its stderr goes to a log file, and it is ready
when a line of its stdout names an ``http://HOST:PORT/`` URL (``cortex serve`` prints one once
it listens; the fake provider prints ``READY http://127.0.0.1:PORT/v1``). The rest of its
stdout is left unread, for a caller that wants the lines after the ready one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "READY_URL",
    "Child",
    "clean_env",
    "cortex_env",
    "log_problems",
    "log_tail",
    "start_cortex",
    "start_process",
]

READY_URL = re.compile(r"http://([\d.]+):(\d+)/")


@dataclass
class Child:
    """A started child process: its name, log file and ready line (and URL, once known)."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    ready_line: str = ""
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return self.proc.returncode

    async def kill(self) -> int:
        """SIGKILL (when still running) and reap it; return the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return await self.proc.wait()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any CORTEX_*/LLM_* or OpenAI setting, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORTEX_", "LLM_")) and k not in ("OPENAI_API_KEY", "OPENAI_API_BASE")
    }
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.update(extra or {})
    return env


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file ("" when it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def log_problems(path: Path, limit: int = 20) -> tuple[int, list[str]]:
    """Lines of a log that report an error (ERROR, CRITICAL, tracebacks): count and first ones."""
    lines: list[str] = []
    count = 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0, []
    for line in text.splitlines():
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            count += 1
            if len(lines) < limit:
                lines.append(line)
    return count, lines


async def _ready_line(child: Child, timeout: float) -> str:
    """The first stdout line that names an http://host:port/ URL (the child's 'I am ready')."""
    stdout = child.proc.stdout
    assert stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await stdout.readline()
                if not raw:
                    await child.proc.wait()
                    raise RuntimeError(
                        f"{child.name} exited (code {child.proc.returncode}) before it was "
                        f"ready; its log {child.log_path}:\n{log_tail(child.log_path)}"
                    )
                line = raw.decode(errors="replace").strip()
                if READY_URL.search(line):
                    return line
    except TimeoutError:
        raise RuntimeError(
            f"{child.name} was not ready within {timeout:g} s; its log {child.log_path}:\n"
            f"{log_tail(child.log_path)}"
        ) from None


def _fresh_log(folder: Path, name: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=folder)
    os.close(handle)
    return Path(path)


async def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path | None = None,
    timeout: float = 60.0,
) -> Child:
    """Start `argv` and wait for its ready line; stderr goes to `log_path` (by default a new
    file NAME-*.log in `cwd`). A child that is not ready in time is killed."""
    if log_path is None:
        log_path = _fresh_log(cwd, name)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    child = Child(name, proc, log_path)
    try:
        child.ready_line = await _ready_line(child, timeout)
    except BaseException:
        await child.kill()
        raise
    return child


def cortex_env(
    *,
    api_base: str,
    database_url: str,
    model: str = "openai/fake",
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A clean environment for `cortex serve` on a free loopback port, with the fake provider
    at `api_base`; `settings` (CORTEX_NAME: value) come last and win."""
    return clean_env(
        {
            "CORTEX_HOST": "127.0.0.1",
            "CORTEX_PORT": "0",
            "CORTEX_DATABASE_URL": database_url,
            "CORTEX_DEFAULT_MODEL": model,
            "CORTEX_LLM_API_BASE": api_base,
            "CORTEX_LLM_API_KEY": "sk-fake",
            **(settings or {}),
        }
    )


async def start_cortex(
    cwd: Path,
    *,
    api_base: str,
    database_url: str | None = None,
    model: str = "openai/fake",
    settings: Mapping[str, str] | None = None,
    name: str = "cortex",
    log_path: Path | None = None,
    timeout: float = 60.0,
) -> Child:
    """`cortex serve` (``python -m cortex serve``) on a free loopback port, ready to serve.

    It runs in `cwd`, so no `.env` of the repository is read; the database is a fresh SQLite
    file `cwd`/cortex.db unless `database_url` says otherwise. `settings` are CORTEX_* entries.
    The child's `url` is its WebSocket URL, ws://HOST:PORT/ws.
    """
    if database_url is None:
        database_url = f"sqlite+aiosqlite:///{cwd / 'cortex.db'}"
    env = cortex_env(api_base=api_base, database_url=database_url, model=model, settings=settings)
    child = await start_process(
        name,
        [sys.executable, "-m", "cortex", "serve"],
        env=env,
        cwd=cwd,
        log_path=log_path,
        timeout=timeout,
    )
    found = READY_URL.search(child.ready_line)
    assert found is not None
    child.url = f"ws://{found[1]}:{found[2]}/ws"
    return child
