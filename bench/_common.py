"""Shared helpers of the bench scripts: child processes, /proc readings, small statistics.

Every bench script runs the fake provider and the Cortex server as separate processes on
127.0.0.1 (started by cortex.testing.processes, the launcher the tests use too), so that the
process being measured has its own event loop and its own core time, and reads memory and CPU
figures of those processes from /proc (psutil is not a dependency). Also here: the timings of
a batch of concurrent streams and their summary (stream_overhead.py, peer_litellm_proxy.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from cortex.testing import processes
from cortex.testing.processes import Child, clean_env, start_process
from cortex.testing.services import PostgresServer

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEM_PROMPT = "You are a helpful assistant."  # Cortex's default, sent by LiteLLM alone too
PROMPT = "Please write a long answer."  # the user message of the benches' streams


async def start_fake_provider(argv: Sequence[str], workdir: Path, name: str = "fake") -> Child:
    """A fake OpenAI-compatible provider process; `argv` after the interpreter. It prints
    "READY http://127.0.0.1:PORT/v1" once it serves: that URL is its `url`."""
    child = await start_process(
        name,
        [sys.executable, *argv],
        env=clean_env(),
        cwd=workdir,
        log_path=workdir / f"{name}.log",
    )
    child.url = child.ready_line.split()[-1]
    return child


async def start_cortex(
    workdir: Path,
    api_base: str,
    settings: Mapping[str, str] | None = None,
    *,
    name: str = "cortex",
    timeout: float = 60.0,
) -> Child:
    """`cortex serve` on a free loopback port with a fresh SQLite file in `workdir` (unless
    `settings` has a CORTEX_DATABASE_URL), its log `workdir`/NAME.log, model `openai/fake`.

    The working directory is `workdir`, so no `.env` of the repository is read.
    """
    return await processes.start_cortex(
        workdir,
        api_base=api_base,
        settings=settings,
        name=name,
        log_path=workdir / f"{name}.log",
        timeout=timeout,
    )


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """Children appended to the yielded list are stopped (last started first) on exit."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in reversed(started):
            await child.stop(timeout=15)


def server_settings(pairs: Sequence[str]) -> dict[str, str]:
    """`--set CORTEX_X=value` arguments of a bench, as environment entries for the server."""
    settings: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("CORTEX_"):
            raise SystemExit(f"--set wants CORTEX_NAME=value, not {pair!r}")
        settings[name] = value
    return settings


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def print_report(report: dict[str, Any], table: str, as_json: bool) -> None:
    """The table on stdout; or, `as_json`, the table on stderr and the report on stdout."""
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)


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
    stat = proc_stat(pid)
    return math.nan if stat is None else stat.cpu


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine so far, from /proc/stat; busy
    leaves out steal (time the hypervisor gave to other guests)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    steal = fields[7]
    busy = total - fields[3] - fields[4] - steal
    return busy / _CLK_TCK, steal / _CLK_TCK, total / _CLK_TCK


class ForeignLoad:
    """How much CPU processes other than ours used while we measured (a shared machine).

    `start()` then `stop(our_cpu_seconds)`: the busy CPU of the machine minus ours, as a
    fraction of all cores over the interval.
    """

    def __init__(self) -> None:
        busy, steal, self.total0 = machine_cpu()
        self.busy0 = busy + steal

    def fraction(self, ours: float) -> float:
        busy, steal, total = machine_cpu()
        busy += steal
        span = total - self.total0
        return max(0.0, (busy - self.busy0 - ours) / span) if span > 0 else math.nan


def proc_fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


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


def proc_stat(pid: int | str) -> ProcStat | None:
    """A process's parent and CPU times from /proc/PID/stat; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(
        int(fields[1]),
        (int(fields[11]) + int(fields[12])) / _CLK_TCK,  # utime, stime
        (int(fields[13]) + int(fields[14])) / _CLK_TCK,  # cutime, cstime
    )


def process_table() -> dict[int, ProcStat]:
    """Every process of the machine, from /proc/PID/stat."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(entry)) is not None:
            table[int(entry)] = stat
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


def postmaster_pid(pg: PostgresServer) -> int:
    """The pid of a private PostgreSQL cluster's postmaster; -1 when it does not run."""
    try:
        return int((Path(str(pg.folder)) / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def postgres_version(pg: PostgresServer) -> str:
    """The major version of a private PostgreSQL cluster ("?" when unknown)."""
    try:
        return (Path(str(pg.folder)) / "data" / "PG_VERSION").read_text().strip()
    except OSError:
        return "?"


# ------------------------------------------------------------- batches of concurrent streams


async def litellm_chunks(
    litellm: ModuleType,
    api_base: str,
    times: list[float],
    clock: Callable[[], float],
    hook: Callable[[Any], None] | None = None,
) -> None:
    """One stream through `litellm.acompletion` from the fake provider at `api_base`, asked
    as Cortex asks (its system prompt, usage included), without Cortex; the `clock` time of
    each content chunk is appended to `times`. `hook` sees the response before its chunks."""
    response = await litellm.acompletion(
        model="openai/fake",
        api_base=api_base,
        api_key="sk-fake",
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PROMPT},
        ],
        stream=True,
        stream_options={"include_usage": True},
    )
    if hook is not None:
        hook(response)
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(clock())


@dataclass
class Stream:
    """One stream: seconds from the request to its first content chunk and to its end."""

    first: float
    total: float  # to the end of the stream / the final stored message
    chunks: int  # content chunks (LiteLLM, a proxy) or delta frames (Cortex) received
    chars: int = 0


@dataclass
class Batch:
    """C concurrent streams started together."""

    wall: float  # first request to last end
    cpu: float  # CPU seconds of the process (tree) doing the relaying work
    streams: list[Stream]


@dataclass
class Summary:
    """The repeats of one batch size over one path, as medians."""

    path: str  # what relayed the streams: "litellm", "litellm+w", "cortex", "proxy"
    concurrency: int
    repeats: int
    first_ms: float  # median first chunk over every stream of every repeat
    total_ms: float  # median batch wall time
    stream_ms: float  # median per-stream total
    chunks_per_s: float  # C * chunks / median batch wall time
    cpu_us_per_chunk: float  # over all repeats
    frames_per_stream: float  # median content chunks / delta frames per stream
    chars: int  # of the longest stream
    batches: list[dict[str, Any]] = field(default_factory=list)


def summarize(path: str, concurrency: int, chunks: int, batches: Sequence[Batch]) -> Summary:
    """The summary of `batches` of `concurrency` streams of `chunks` chunks each."""
    streams = [s for b in batches for s in b.streams]
    wall = median([b.wall for b in batches])
    return Summary(
        path=path,
        concurrency=concurrency,
        repeats=len(batches),
        first_ms=median([s.first for s in streams]) * 1000,
        total_ms=wall * 1000,
        stream_ms=median([s.total for s in streams]) * 1000,
        chunks_per_s=concurrency * chunks / wall,
        cpu_us_per_chunk=sum(b.cpu for b in batches) / (chunks * concurrency * len(batches)) * 1e6,
        frames_per_stream=median([float(s.chunks) for s in streams]),
        chars=max((s.chars for s in streams), default=0),
        batches=[
            {
                "wall_ms": round(b.wall * 1000, 2),
                "cpu_ms": round(b.cpu * 1000, 1),
                "first_ms": [round(s.first * 1000, 2) for s in b.streams],
            }
            for b in batches
        ],
    )
