"""Capacity: concurrent conversations one process sustains at 40 tokens/s each, one run.

    .venv/bin/python bench/capacity.py [--steps 10 25 50 100 200 400] [--tokens 200]
                                       [--chunk-delay 0.025] [--workers 2] [--no-litellm]
                                       [--database sqlite|postgres] [--profile] [--json]

Processes, all on 127.0.0.1: the fake OpenAI-compatible provider (cortex.testing's, one word
per chunk, --chunk-delay between chunks: 0.025 s is 40 tokens/s), a `cortex serve` process
on a fresh SQLite file (or, with `--database postgres`, on a fresh database of a private
PostgreSQL cluster started for the run by cortex.testing.services.PostgresServer: needs
Debian's postgresql, see scripts/test.sh), and `--workers` client processes (bench/_swarm.py).

Each step C: C clients each send the first message of a new conversation, their starts
spread evenly over one second, and record the arrival time of every delta frame of the
reply. The step passes when every reply completes and the 99th percentile of the gaps
between consecutive delta frames of a stream, over all streams, is under 100 ms. Steps run
upward until one fails; then (--refine) one step halfway between the last pass and it.
Printed per step: p50/p99/max gap, first-delta latency, the server's CPU use (1.0 = one core
busy), PostgreSQL's (all its processes) on that database, its RSS, and the largest passing C.

The floor, in the same run: the same C streams through `bench/_relay.py`, a bare relay (aiohttp
reads the SSE, orjson decodes it, websockets writes the frames at Cortex's delta interval; no
database, logs or metrics), on the same clients (--no-relay skips it). Cortex's CPU against it
is the ratio printed.

For comparison, the same C streams through `litellm.acompletion` alone in one client
process (no Cortex, no WebSocket, no database): what LiteLLM's own per-chunk cost allows on
this machine, i.e. the floor Cortex sits on (--no-litellm skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    PROMPT,
    REPO,
    ForeignLoad,
    children,
    machine,
    median,
    percentile,
    postgres_version,
    postmaster_pid,
    print_report,
    proc_cpu_seconds,
    proc_status,
    raise_fd_limit,
    server_settings,
    start_cortex,
    start_fake_provider,
    tree_cpu_seconds,
)
from _swarm import Profiler, Swarm, db_latency, scrape

from cortex.testing.processes import Child, log_problems
from cortex.testing.services import PostgresServer

LIMIT_MS = 100.0
STAGGER_S = 1.0
TIMEOUT = 120.0


@dataclass
class Step:
    path: str  # "cortex" or "litellm"
    concurrency: int
    completed: int
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    first_p50_ms: float
    first_p99_ms: float
    frames_per_stream: float
    tokens_per_s: float  # median over streams: reply chunks / (final - first delta)
    wall_s: float
    cpu_share: float  # CPU seconds of the process doing the work / wall seconds
    rss_kib: int
    errors: list[str]
    long_gaps: int  # gaps of LIMIT_MS or more
    long_gaps_by_second: dict[int, int]  # second of the run (from the first send) -> count
    db: dict[str, dict[str, float]]  # the server's store operations over the step
    db_cpu_share: float = float("nan")  # PostgreSQL's CPU seconds / wall seconds (postgres)

    @property
    def passed(self) -> bool:
        return self.completed == self.concurrency and self.gap_p99_ms < LIMIT_MS


def summarize(
    path: str,
    concurrency: int,
    tokens: int,
    results: list[dict[str, Any]],
    wall: float,
    cpu: float,
    rss: int,
    db: dict[str, dict[str, float]] | None = None,
    db_cpu: float = float("nan"),
) -> Step:
    streams = [s for r in results for s in r["streams"]]
    done = [s for s in streams if s["status"] == "complete"]
    gaps: list[float] = []
    late: list[float] = []  # when each gap over the limit ended, seconds after the first send
    start = min((s["sent"] for s in streams), default=0.0)
    for s in done:
        times = s["times_us"]
        for a, b in zip(times, times[1:], strict=False):
            gap = (b - a) / 1000
            gaps.append(gap)
            if gap >= LIMIT_MS:
                late.append(s["sent"] - start + b / 1e6)
    firsts = [(s["first"] - s["sent"]) * 1000 for s in done if s["first"]]
    rates = [tokens / (s["final"] - s["first"]) for s in done if s["final"] > s["first"] > 0]
    errors = sorted({e for s in streams for e in s["errors"]} | {str(s["status"]) for s in streams})
    return Step(
        path=path,
        concurrency=concurrency,
        completed=len(done),
        gap_p50_ms=percentile(gaps, 50),
        gap_p99_ms=percentile(gaps, 99),
        gap_max_ms=max(gaps, default=float("nan")),
        first_p50_ms=percentile(firsts, 50),
        first_p99_ms=percentile(firsts, 99),
        frames_per_stream=median([float(s["deltas"]) for s in done]),
        tokens_per_s=median(rates),
        wall_s=wall,
        cpu_share=cpu / wall if wall else float("nan"),
        rss_kib=rss,
        errors=[e for e in errors if e != "complete"][:5],
        long_gaps=len(late),
        long_gaps_by_second=_by_second(late),
        db=db or {},
        db_cpu_share=db_cpu / wall if wall else float("nan"),
    )


def _by_second(moments: list[float]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for moment in moments:
        counts[int(moment)] = counts.get(int(moment), 0) + 1
    return dict(sorted(counts.items()))


async def cortex_step(
    swarm: Swarm,
    server: Child,
    concurrency: int,
    tokens: int,
    spy: Profiler | None,
    postmaster: int | None = None,
    path: str = "cortex",
) -> Step:
    opened = await swarm.split(
        "connect",
        concurrency,
        TIMEOUT,
        url=server.url,
        parallel=25,
        offer_deflate=False,
        timeout=60.0,
    )
    if sum(o["opened"] for o in opened) != concurrency:
        raise RuntimeError(f"could not open {concurrency} connections: {opened}")
    metrics0 = await scrape(server.url) if path == "cortex" else {}
    start_at = time.monotonic() + 0.5
    cpu0 = proc_cpu_seconds(server.pid)
    db_cpu0 = tree_cpu_seconds(postmaster) if postmaster else float("nan")
    async with spy if spy is not None else contextlib.nullcontext():
        # Each worker spreads its own share over the same second, so all starts interleave.
        results = await swarm.split(
            "chat",
            concurrency,
            TIMEOUT + 30,
            content=PROMPT,
            start_at=start_at,
            stagger=STAGGER_S,
            timeout=TIMEOUT,
        )
    end = max((s["final"] for r in results for s in r["streams"]), default=time.monotonic())
    cpu = proc_cpu_seconds(server.pid) - cpu0
    db_cpu = tree_cpu_seconds(postmaster) - db_cpu0 if postmaster else float("nan")
    rss = proc_status(server.pid).get("VmRSS", 0)
    db = db_latency(metrics0, await scrape(server.url)) if path == "cortex" else {}
    await swarm.each("close", TIMEOUT, timeout=10.0)
    return summarize(path, concurrency, tokens, results, end - start_at, cpu, rss, db, db_cpu)


async def litellm_step(swarm: Swarm, api_base: str, concurrency: int, tokens: int) -> Step:
    worker = swarm.workers[0]  # one process, as Cortex is one process
    start_at = time.monotonic() + 0.5
    cpu0 = proc_cpu_seconds(worker.pid)
    result = await worker.call(
        "litellm",
        TIMEOUT + 30,
        n=concurrency,
        api_base=api_base,
        start_at=start_at,
        stagger=STAGGER_S,
        timeout=TIMEOUT,
    )
    end = max((s["final"] for s in result["streams"]), default=time.monotonic())
    cpu = proc_cpu_seconds(worker.pid) - cpu0
    rss = proc_status(worker.pid).get("VmRSS", 0)
    return summarize("litellm", concurrency, tokens, [result], end - start_at, cpu, rss)


def next_step(steps: list[int], results: list[Step], refine: int) -> int | None:
    """The next concurrency to try: `steps` upward until one fails, then up to `refine`
    halving steps between the last pass and the first failure."""
    passed = [s.concurrency for s in results if s.passed]
    failed = [s.concurrency for s in results if not s.passed]
    if not failed:
        higher = [c for c in steps if c > max(passed, default=0)]
        return higher[0] if higher else None
    high = min(failed)
    low = max([c for c in passed if c < high], default=0)
    middle = (low + high) // 2
    refined = sum(1 for s in results if s.concurrency not in steps)
    if low and refined < refine and low < middle < high:
        return middle
    return None


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.database != "postgres":
        return await measure_on(args, {}, None)
    postgres = PostgresServer()
    try:
        await asyncio.to_thread(postgres.start)
        url = await asyncio.to_thread(postgres.create_database, "cortex_capacity")
        report = await measure_on(args, {"CORTEX_DATABASE_URL": url}, postmaster_pid(postgres))
        report["database"] = f"postgres {postgres_version(postgres)}"
        return report
    finally:
        await asyncio.to_thread(postgres.stop)


async def measure_on(
    args: argparse.Namespace, database: dict[str, str], postmaster: int | None
) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="cortex-capacity-") as tmp:
        workdir = Path(tmp)
        async with children() as started:
            fake = await start_fake_provider(
                [
                    "-m",
                    "cortex.testing.fake_openai",
                    "--words",
                    str(args.tokens),
                    "--chunk-delay",
                    str(args.chunk_delay),
                ],
                workdir,
            )
            started.append(fake)
            server = await start_cortex(
                workdir,
                fake.url,
                {
                    "CORTEX_MAX_CONNECTIONS": "50000",
                    "CORTEX_RATE_PER_S": "100000",
                    "CORTEX_RATE_BURST": "100000",
                    **database,
                    **server_settings(args.set),
                },
            )
            started.append(server)
            relay = None
            if not args.no_relay:
                interval = server_settings(args.set).get("CORTEX_DELTA_INTERVAL_MS", "50")
                relay = await start_fake_provider(
                    [str(REPO / "bench" / "_relay.py"), fake.url, "--interval-ms", interval],
                    workdir,
                    name="relay",
                )
                started.append(relay)
            swarm = await Swarm.start(args.workers, workdir)
            foreign = ForeignLoad()
            ours0 = time.process_time() + sum(
                proc_cpu_seconds(p) for p in (fake.pid, server.pid, *swarm.pids)
            )
            if postmaster:
                ours0 += tree_cpu_seconds(postmaster)
            idle_rss = proc_status(server.pid).get("VmRSS", 0)
            cortex: list[Step] = []
            litellm: list[Step] = []
            floor: list[Step] = []
            profile: list[str] = []
            try:
                # Warm-up, not counted: first-call costs of LiteLLM and of the server.
                await cortex_step(swarm, server, 5, args.tokens, None, postmaster)
                concurrency = next_step(args.steps, cortex, args.refine)
                while concurrency is not None:
                    spy = None
                    if args.profile and not profile and concurrency >= args.profile:
                        spy = Profiler(server.pid, workdir / "profile.txt")
                    cortex.append(
                        await cortex_step(swarm, server, concurrency, args.tokens, spy, postmaster)
                    )
                    if spy is not None:
                        profile = [f"at C={concurrency}:", *spy.top(args.profile_lines)]
                    await asyncio.sleep(1.0)
                    concurrency = next_step(args.steps, cortex, args.refine)
                if relay is not None:
                    await cortex_step(swarm, relay, 5, args.tokens, None, path="relay")
                    for step in cortex:
                        floor.append(
                            await cortex_step(
                                swarm, relay, step.concurrency, args.tokens, None, path="relay"
                            )
                        )
                        await asyncio.sleep(1.0)
                if not args.no_litellm:
                    await litellm_step(swarm, fake.url, 5, args.tokens)  # its import, warm-up
                    for step in cortex:
                        litellm.append(
                            await litellm_step(swarm, fake.url, step.concurrency, args.tokens)
                        )
                        await asyncio.sleep(1.0)
                ours = time.process_time() + sum(
                    proc_cpu_seconds(p) for p in (fake.pid, server.pid, *swarm.pids)
                )
                if postmaster:
                    ours += tree_cpu_seconds(postmaster)
            finally:
                await swarm.stop()
            other_cpu = foreign.fraction(ours - ours0)
            status = proc_status(server.pid)
            code = await server.stop()
            problems, lines = log_problems(server.log_path)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "database": "sqlite" if postmaster is None else "postgres",
        "tokens": args.tokens,
        "chunk_delay_s": args.chunk_delay,
        "workers": args.workers,
        "settings": args.set,
        "fd_limit": fd_limit,
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "cortex": [asdict(s) for s in cortex],
        "litellm": [asdict(s) for s in litellm],
        "relay": [asdict(s) for s in floor],
        "profile": profile,
        "server": {
            "idle_rss_kib": idle_rss,
            "peak_rss_kib": status.get("VmHWM", 0),
            "exit_code": code,
            "log_errors": problems,
            "log_error_lines": lines,
        },
    }


# Issue 24's figures: the server's CPU at 60 conversations on 495a8b5 (before the direct path),
# and the share of a core 200 conversations may use (>= 500 conversations per core).
CPU_AT_60_BEFORE = 0.92
CPU_AT_200_TARGET = 0.4


def targets(report: dict[str, Any]) -> str:
    """The server's CPU at 60 and at 200 conversations against issue 24's targets."""
    steps = {s["concurrency"]: s for s in report["cortex"]}
    parts = []
    if 60 in steps:
        parts.append(f"CPU at 60: {steps[60]['cpu_share']:.2f} (was {CPU_AT_60_BEFORE})")
    if 200 in steps:
        at = steps[200]
        passed = at["completed"] == 200 and at["gap_p99_ms"] < LIMIT_MS
        ok = passed and at["cpu_share"] <= CPU_AT_200_TARGET
        parts.append(
            f"CPU at 200: {at['cpu_share']:.2f}, p99 gap {at['gap_p99_ms']:.1f} ms "
            f"({'meets' if ok else 'misses'} <= {CPU_AT_200_TARGET} of a core with p99 < "
            f"{LIMIT_MS:g} ms)"
        )
    relay = {s["concurrency"]: s for s in report.get("relay", ())}
    for c in sorted(set(relay) & set(steps)):
        ratio = steps[c]["cpu_share"] / relay[c]["cpu_share"]
        parts.append(f"CPU at {c} against the bare relay: {ratio:.2f}x")
    return "targets: " + ("; ".join(parts) if parts else "run steps 60 and 200 to see them")


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    rate = 1 / report["chunk_delay_s"] if report["chunk_delay_s"] else float("inf")
    out = [
        f"capacity  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m.get('litellm', '?')}, websockets {m.get('websockets', '?')}, "
        f"cortex {m.get('cortex_commit', '?')}",
        f"replies of {report['tokens']} one-word chunks, {report['chunk_delay_s'] * 1000:g} ms "
        f"apart ({rate:.0f} tokens/s), starts spread over {STAGGER_S:g} s; cortex on "
        f"{report.get('database', 'sqlite')}; pass: all complete "
        f"and p99 gap < {LIMIT_MS:g} ms; other processes used "
        f"{report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile"
        + (f"; server settings: {' '.join(report['settings'])}" if report["settings"] else ""),
        "",
        f"{'path':<8} {'C':>5} {'done':>5} {'gap p50':>8} {'gap p99':>8} {'gap max':>8} "
        f"{'1st p50':>8} {'1st p99':>8} {'frames':>6} {'tok/s':>6} {'CPU':>5} {'RSS MiB':>7} "
        f"{'':>4}",
    ]
    best: dict[str, int] = {}
    for path in ("cortex", "relay", "litellm"):
        steps = sorted((Step(**s) for s in report.get(path, ())), key=lambda s: s.concurrency)
        for s in steps:
            out.append(
                f"{path:<8} {s.concurrency:>5} {s.completed:>5} {s.gap_p50_ms:>8.1f} "
                f"{s.gap_p99_ms:>8.1f} {s.gap_max_ms:>8.1f} {s.first_p50_ms:>8.1f} "
                f"{s.first_p99_ms:>8.1f} {s.frames_per_stream:>6.0f} {s.tokens_per_s:>6.1f} "
                f"{s.cpu_share:>5.2f} {s.rss_kib / 1024:>7.0f} "
                f"{'pass' if s.passed else 'FAIL'}"
            )
            if s.errors:
                out.append(f"{'':<15} errors: {'; '.join(s.errors)}")
            if s.long_gaps:
                when = ", ".join(f"{k}s: {v}" for k, v in s.long_gaps_by_second.items())
                out.append(f"{'':<15} {s.long_gaps} gaps >= {LIMIT_MS:g} ms, by second: {when}")
            if s.db_cpu_share == s.db_cpu_share:  # not NaN: PostgreSQL's CPU was measured
                out.append(f"{'':<15} postgres CPU: {s.db_cpu_share:.2f}")
            if s.db:
                ops = ", ".join(
                    f"{op} {v['calls']:.0f}x mean {v['mean_ms']:.1f} p99<={v['p99_ms']:g}"
                    for op, v in sorted(s.db.items(), key=lambda kv: -kv[1]["calls"])[:3]
                )
                out.append(f"{'':<15} db ms: {ops}")
        best[path] = max((s.concurrency for s in steps if s.passed), default=0)
    out.append("")
    out.append(
        f"largest passing concurrency: cortex {best['cortex']}"
        + (f", the bare relay {best['relay']}" if report.get("relay") else "")
        + (f", litellm alone {best['litellm']}" if report["litellm"] else "")
        + " (of the concurrencies tried)"
    )
    out.append(targets(report))
    if report["profile"]:
        out += ["", "server profile (py-spy):"]
        out += [f"  {line}" for line in report["profile"]]
    s = report["server"]
    out += [
        "",
        f"cortex server RSS: idle {s['idle_rss_kib'] / 1024:.0f} MiB, peak (VmHWM) "
        f"{s['peak_rss_kib'] / 1024:.0f} MiB; exit code {s['exit_code']}, error lines in its "
        f"log: {s['log_errors']}",
    ]
    out += [f"  {line}" for line in s["log_error_lines"]]
    out += [
        "",
        "gap: time between consecutive delta frames (chunks, for litellm) of one stream, as the",
        "client saw them; 1st: send to first delta; frames: per stream (fewer than chunks when",
        "the server merged deltas of a lagging writer); tok/s: chunks / (last - first delta);",
        "CPU: the process doing the work (cortex server / the bare relay, bench/_relay.py /",
        "the litellm client), 1.0 = one core;",
        "postgres CPU: the PostgreSQL cluster's processes over the same step, 1.0 = one core.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400], metavar="C"
    )
    parser.add_argument("--tokens", type=int, default=200, help="chunks per reply")
    parser.add_argument("--chunk-delay", type=float, default=0.025, help="seconds between chunks")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--refine", type=int, default=1, help="halving steps after the first failure"
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM alone")
    parser.add_argument(
        "--no-relay", action="store_true", help="skip the bare relay (bench/_relay.py)"
    )
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="Cortex's database: a fresh SQLite file, or a database of a private PostgreSQL "
        "cluster started for the run (needs Debian's postgresql)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="C",
        help="py-spy the server during the first step with at least C conversations",
    )
    parser.add_argument("--profile-lines", type=int, default=15)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CORTEX_NAME=VALUE",
        help="a setting for the Cortex server (repeatable), e.g. CORTEX_CHECKPOINT_MS=60000",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    args.steps = sorted(set(args.steps))
    if min(args.steps) < 1 or args.tokens < 2 or args.workers < 1 or args.chunk_delay <= 0:
        parser.error("--steps, --workers, --chunk-delay must be positive, --tokens >= 2")
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0 if report["server"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
