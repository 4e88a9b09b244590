"""Idle connections: server memory per WebSocket connection and time to accept them, one run.

    .venv/bin/python bench/connections.py [--connections 10000] [--workers 4]
                                          [--servers websockets websockets-nodeflate cortex]
                                          [--no-deflate-offer] [--json]

Each server under test runs as a process of its own on 127.0.0.1, and the connections come
from `--workers` client processes (bench/_swarm.py, a lean RFC 6455 client), at most 25
handshakes in flight per worker. Servers:
- `websockets`: a bare `websockets.asyncio.server.serve()` with its defaults (this script in
  server mode: it answers every message with a pong), the baseline of issue 8 (~47 KiB/conn);
- `websockets-nodeflate`: the same with `compression=None`, to show what permessage-deflate
  costs;
- `cortex`: `cortex serve` (fresh SQLite file, no provider call is made).
For each: open and close 20 connections (first-use costs), read VmRSS of the server from
/proc, open N connections, send each one application `ping` and wait for its `pong` (so each
connection has carried a message, as a real client's first subscribe would), wait for RSS to
settle, read VmRSS again. Printed: (RSS after - RSS before) / N in KiB (target for cortex:
<= 40 KiB), the time from the first connect to the last completed handshake, the server's CPU
for accepting them, and RSS after the clients left. By default the clients offer
permessage-deflate, as browsers do (`--no-deflate-offer`: they don't).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    ForeignLoad,
    children,
    machine,
    print_report,
    proc_cpu_seconds,
    proc_fd_count,
    proc_status,
    raise_fd_limit,
    start_cortex,
)
from _swarm import Profiler, Swarm, open_ws

from cortex.testing.processes import Child, clean_env, log_problems, start_process

SERVERS = ("websockets", "websockets-nodeflate", "cortex")
TIMEOUT = 300.0


@dataclass
class Result:
    server: str
    connections: int
    opened: int
    failed: int
    answered: int  # connections whose ping got its pong
    extensions: dict[str, int]  # negotiated Sec-WebSocket-Extensions -> connections
    rss_before_kib: int
    rss_after_kib: int
    rss_closed_kib: int  # after every client left
    kib_per_conn: float
    accept_s: float  # first connect -> last completed handshake
    accept_cpu_s: float  # server CPU over the connecting
    clients_cpu_s: float  # the client processes' CPU over the connecting
    listen_drops: int  # SYNs/ACKs the kernel dropped at a full accept queue meanwhile
    fds_open: int
    failures: dict[str, int]
    log_errors: int
    log_lines: int  # lines the server logged over the whole run
    server_cpu_s: float  # the server's CPU over its whole life


# ------------------------------------------------------------------ the bare websockets server


async def _bare_server(compression: bool) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def handler(ws: ServerConnection) -> None:
        async for _message in ws:
            await ws.send('{"type":"pong"}')

    kwargs: dict[str, Any] = {} if compression else {"compression": None}
    async with serve(handler, "127.0.0.1", 0, **kwargs) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"READY http://127.0.0.1:{port}/", flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()


async def start_server(kind: str, workdir: Path) -> Child:
    if kind == "cortex":
        return await start_cortex(
            workdir,
            "http://127.0.0.1:9/v1",  # never called: no message is sent
            {
                "CORTEX_MAX_CONNECTIONS": "100000",
                "CORTEX_RATE_PER_S": "100000",
                "CORTEX_RATE_BURST": "100000",
            },
        )
    argv = [sys.executable, str(REPO / "bench" / "connections.py"), "--serve", kind]
    child = await start_process(
        kind, argv, env=clean_env(), cwd=workdir, log_path=workdir / f"{kind}.log"
    )
    child.url = child.ready_line.split()[-1].replace("http://", "ws://") + "ws"
    return child


# ------------------------------------------------------------------------------- the run


def listen_drops() -> int:
    """TcpExt ListenDrops of the machine: handshakes dropped at a full accept queue."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenDrops", 0))
    return 0


async def settle(pid: int, seconds: float = 5.0) -> int:
    """VmRSS once it stops moving (or after `seconds`)."""
    last = proc_status(pid).get("VmRSS", 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = proc_status(pid).get("VmRSS", 0)
        if abs(now - last) < 64:
            return now
        last = now
    return last


async def measure_one(
    kind: str, workdir: Path, swarm: Swarm, n: int, offer_deflate: bool, profile: list[str]
) -> Result:
    server = await start_server(kind, workdir)
    try:
        # First-use costs (imports, allocator pools) are not a connection's.
        warm = [await open_ws(server.url, offer_deflate=offer_deflate) for _ in range(20)]
        for ws in warm:
            await ws.ping(10)
        for ws in warm:
            await ws.close()
        await asyncio.sleep(0.5)
        before = await settle(server.pid)
        cpu0 = proc_cpu_seconds(server.pid)
        clients0 = sum(proc_cpu_seconds(p) for p in swarm.pids)
        drops0 = listen_drops()
        spy = Profiler(server.pid, workdir / f"profile-{kind}.txt")
        async with spy if kind in profile else contextlib.nullcontext(spy):
            opened = await swarm.split(
                "connect",
                n,
                TIMEOUT,
                url=server.url,
                parallel=25,
                offer_deflate=offer_deflate,
                timeout=120.0,
            )
        if kind in profile:
            profile[profile.index(kind)] = "\n".join([f"{kind}:", *spy.top(12)])
        accept_cpu = proc_cpu_seconds(server.pid) - cpu0
        clients_cpu = sum(proc_cpu_seconds(p) for p in swarm.pids) - clients0
        drops = listen_drops() - drops0
        pinged = await swarm.each("ping", TIMEOUT, timeout=60.0)
        after = await settle(server.pid)
        fds = proc_fd_count(server.pid)
        await swarm.each("close", TIMEOUT, timeout=10.0)
        closed = await settle(server.pid)
        server_cpu = proc_cpu_seconds(server.pid)
    finally:
        await server.stop()
    problems, _lines = log_problems(server.log_path)
    count = sum(o["opened"] for o in opened)
    extensions: dict[str, int] = {}
    failures: dict[str, int] = {}
    for o in opened:
        for key, value in o["extensions"].items():
            extensions[key] = extensions.get(key, 0) + value
        for key, value in o["failures"].items():
            failures[key] = failures.get(key, 0) + value
    return Result(
        server=kind,
        connections=n,
        opened=count,
        failed=sum(o["failed"] for o in opened),
        answered=sum(p["answered"] for p in pinged),
        extensions=extensions,
        rss_before_kib=before,
        rss_after_kib=after,
        rss_closed_kib=closed,
        kib_per_conn=(after - before) / count if count else float("nan"),
        accept_s=max(o["last_open"] for o in opened) - min(o["started"] for o in opened),
        accept_cpu_s=accept_cpu,
        clients_cpu_s=clients_cpu,
        listen_drops=drops,
        fds_open=fds,
        failures=failures,
        log_errors=problems,
        server_cpu_s=server_cpu,
        log_lines=len(server.log_path.read_text(errors="replace").splitlines()),
    )


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    results: list[Result] = []
    profile = list(args.profile)  # each entry is replaced by its profile's text
    with tempfile.TemporaryDirectory(prefix="cortex-conns-") as tmp:
        workdir = Path(tmp)
        async with children():
            foreign = ForeignLoad()
            ours0 = time.process_time()
            swarm = await Swarm.start(args.workers, workdir)
            try:
                for kind in args.servers:
                    results.append(
                        await measure_one(
                            kind,
                            workdir,
                            swarm,
                            args.connections,
                            not args.no_deflate_offer,
                            profile,
                        )
                    )
                    await asyncio.sleep(1.0)
                clients = await swarm.each("stats", 30)
                ours = time.process_time() - ours0 + sum(c["cpu_s"] for c in clients)
                other_cpu = foreign.fraction(ours + sum(r.server_cpu_s for r in results))
            finally:
                await swarm.stop()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "connections": args.connections,
        "workers": args.workers,
        "fd_limit": fd_limit,
        "deflate_offered": not args.no_deflate_offer,
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "client_rss_kib": [c["rss_kib"] for c in clients],
        "results": [asdict(r) for r in results],
        "profiles": profile,
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    offered = "offer" if report["deflate_offered"] else "do not offer"
    out = [
        f"connections  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m.get('litellm', '?')}, websockets {m.get('websockets', '?')}, "
        f"cortex {m.get('cortex_commit', '?')}",
        f"{report['connections']} idle WebSocket connections from {report['workers']} client "
        f"processes (fd limit {report['fd_limit']}); clients {offered} permessage-deflate; "
        f"other processes used {report['other_processes_cpu_fraction']:.0%} of the CPU "
        "meanwhile",
        "",
        f"{'server':<21} {'opened':>6} {'pong':>6} {'KiB/conn':>8} {'RSS before':>10} "
        f"{'RSS after':>9} {'after close':>11} {'accept s':>8} {'conn/s':>7} {'CPU s':>6} "
        f"{'us/conn':>7} {'clients CPU s':>13} {'drops':>5}  extension",
    ]
    results = [Result(**r) for r in report["results"]]
    for r in results:
        ext = ", ".join(f"{k.split(';')[0]}: {v}" for k, v in r.extensions.items())
        out.append(
            f"{r.server:<21} {r.opened:>6} {r.answered:>6} {r.kib_per_conn:>8.1f} "
            f"{r.rss_before_kib / 1024:>7.0f} MiB {r.rss_after_kib / 1024:>5.0f} MiB "
            f"{r.rss_closed_kib / 1024:>7.0f} MiB {r.accept_s:>8.2f} "
            f"{r.opened / r.accept_s:>7.0f} {r.accept_cpu_s:>6.2f} "
            f"{r.accept_cpu_s / r.opened * 1e6:>7.0f} {r.clients_cpu_s:>13.2f} "
            f"{r.listen_drops:>5}  {ext}"
        )
        if r.failed:
            out.append(f"  {r.failed} failed: {r.failures}")
        if r.log_errors:
            out.append(f"  {r.log_errors} error lines in its log")
        if r.log_lines > 100:
            out.append(f"  {r.server} logged {r.log_lines} lines (one or more per connection)")
    by = {r.server: r for r in results}
    if "cortex" in by and "websockets" in by:
        c, w = by["cortex"], by["websockets"]
        out.append(
            "cortex / bare websockets: memory per connection "
            f"{c.kib_per_conn / w.kib_per_conn:.2f}x, accept time "
            f"{c.accept_s / w.accept_s:.2f}x; cortex {c.kib_per_conn:.1f} KiB/conn "
            f"(target <= 40: {'met' if c.kib_per_conn <= 40 else 'NOT met'})"
        )
    out += [
        "",
        "KiB/conn: (server VmRSS with the connections open - before) / connections opened;",
        "accept s: first connect to the last completed handshake; CPU s: the server's CPU over",
        "that interval (us/conn: per connection); drops: handshakes the kernel dropped at a",
        "full accept queue meanwhile (TcpExt ListenDrops); after close: VmRSS once every",
        "client left (what the allocator kept).",
        f"client processes' RSS: {[round(k / 1024) for k in report['client_rss_kib']]} MiB",
    ]
    for text in report["profiles"]:
        out += ["", "server profile (py-spy) while accepting, " + text]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument(
        "--servers", nargs="+", choices=SERVERS, default=list(SERVERS), metavar="SERVER"
    )
    parser.add_argument("--no-deflate-offer", action="store_true")
    parser.add_argument(
        "--profile",
        nargs="*",
        choices=SERVERS,
        default=[],
        metavar="SERVER",
        help="py-spy these servers while they accept the connections",
    )
    parser.add_argument("--serve", choices=SERVERS[:2], help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    if args.serve:
        raise_fd_limit()
        asyncio.run(_bare_server(compression=args.serve == "websockets"))
        return 0
    if args.connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be positive")
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
