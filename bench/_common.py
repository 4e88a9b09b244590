"""Shared helpers of the bench scripts: child processes, /proc readings, small statistics.

Every bench script runs the fake provider and the Cortex server as separate processes on
127.0.0.1, so that the process being measured has its own event loop and its own core time,
and reads memory and CPU figures of those processes from /proc (psutil is not a dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import math
import os
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_READY_URL = re.compile(r"http://([\d.]+):(\d+)/")


@dataclass
class Child:
    """A child process started by a bench script, with its log file."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any CORTEX_*/LLM_* setting of the caller's shell, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORTEX_", "LLM_")) and k not in ("OPENAI_API_KEY", "OPENAI_API_BASE")
    }
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    env.update(extra)
    return env


async def _read_ready(
    proc: asyncio.subprocess.Process, name: str, log_path: Path, timeout: float
) -> str:
    """The first stdout line that names an http://host:port/ URL (the child's 'I am ready')."""
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    tail = log_tail(log_path)
                    raise RuntimeError(f"{name} exited before it was ready; its log:\n{tail}")
                line = raw.decode(errors="replace").strip()
                found = _READY_URL.search(line)
                if found:
                    return line
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"{name} was not ready within {timeout:g} s") from None


async def start_child(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    timeout: float = 60.0,
) -> tuple[Child, str]:
    """Start `argv`, send its stderr to `log_path`, return it with its ready line."""
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
        line = await _read_ready(proc, name, log_path, timeout)
    except BaseException:
        await child.stop(timeout=5)
        raise
    return child, line


async def start_fake_provider(argv: Sequence[str], workdir: Path, name: str = "fake") -> Child:
    """A fake OpenAI-compatible provider process; `argv` after the interpreter."""
    child, line = await start_child(
        name,
        [sys.executable, *argv],
        env=clean_env({}),
        cwd=workdir,
        log_path=workdir / f"{name}.log",
    )
    child.url = line.split()[-1]  # "READY http://127.0.0.1:PORT/v1"
    return child


async def start_cortex(
    workdir: Path, api_base: str, settings: Mapping[str, str] | None = None
) -> Child:
    """`cortex serve` on a free loopback port with a fresh SQLite file in `workdir`.

    The working directory is `workdir`, so no `.env` of the repository is read.
    """
    env = clean_env(
        {
            "CORTEX_HOST": "127.0.0.1",
            "CORTEX_PORT": "0",
            "CORTEX_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'cortex.db'}",
            "CORTEX_DEFAULT_MODEL": "openai/fake",
            "CORTEX_LLM_API_BASE": api_base,
            "CORTEX_LLM_API_KEY": "sk-fake",
            **(settings or {}),
        }
    )
    child, line = await start_child(
        "cortex",
        [sys.executable, "-m", "cortex.cli", "serve"],
        env=env,
        cwd=workdir,
        log_path=workdir / "cortex.log",
    )
    found = _READY_URL.search(line)
    assert found is not None
    child.url = f"ws://{found[1]}:{found[2]}/ws"
    return child


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """Children appended to the yielded list are stopped (last started first) on exit."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            await child.stop(timeout=15)


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of a process, in KiB; {} once it is gone."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("Vm"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0])
    return values


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (10 ms resolution on Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    idle = fields[3] + fields[4]
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


class ForeignLoad:
    """How much CPU processes other than ours used while we measured (a shared machine).

    `start()` then `stop(our_cpu_seconds)`: the busy CPU of the machine minus ours, as a
    fraction of all cores over the interval.
    """

    def __init__(self) -> None:
        self.busy0, self.total0 = system_cpu()

    def fraction(self, ours: float) -> float:
        busy, total = system_cpu()
        span = total - self.total0
        return max(0.0, (busy - self.busy0 - ours) / span) if span > 0 else math.nan


def proc_fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


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


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def git_revision() -> str:
    """The commit measured, with "+dirty" when cortex/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "cortex", "migrations"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "litellm": _version("litellm"),
        "websockets": _version("websockets"),
        "cortex_commit": git_revision(),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ProcStat(NamedTuple):
    parent: int
    cpu: float  # utime + stime, seconds
    reaped: float  # cutime + cstime: children it has reaped


def process_table() -> dict[int, ProcStat]:
    """Every process of the machine, from /proc/PID/stat."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        table[int(entry)] = ProcStat(
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / _CLK_TCK,
            (int(fields[13]) + int(fields[14])) / _CLK_TCK,
        )
    return table


def tree_cpu(roots: Sequence[int], table: dict[int, ProcStat]) -> float:
    """CPU seconds of these processes and all their descendants (nginx workers, PostgreSQL
    backends), as `table` has them."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.parent, []).append(pid)
    seen: set[int] = set()
    todo = [p for p in roots if p in table]
    total = 0.0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid].cpu
        todo.extend(children.get(pid, []))
    return total


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process, its live descendants and its reaped children (cutime, cstime).

    For a PostgreSQL postmaster: its backends come and go, and a backend's time moves to
    the postmaster's cutime/cstime when it is reaped, so the sum only grows.
    """
    table = process_table()
    if root not in table:
        return math.nan
    return table[root].reaped + tree_cpu([root], table)
