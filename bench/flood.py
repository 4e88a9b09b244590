"""Flood: what one abusive connection costs everyone else, in one run.

    .venv/bin/python bench/flood.py [--seconds 8] [--json]

A `cortex serve` process on a fresh SQLite file; a well-behaved client pings it every 100 ms and
times each round trip. First alone (the baseline), then beside one abusive connection (in a
process of its own), one attack after another:
- `pings`: 19 pings every 60 ms (about 316 a second, 15x the frame limit);
- `1MiB`: frames of 1 MiB (JSON, an unknown field) as fast as the socket takes them;
- `bad-json`: 64 KiB frames that are not JSON, as fast as the socket takes them.
Printed for each: the other client's ping round trip (p50, p99, max), whether and when the
abuser was closed (1008 expected), and the server's CPU meanwhile. Target: the other client's
p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    children,
    machine,
    percentile,
    print_report,
    proc_cpu_seconds,
    start_cortex,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

PING = json.dumps({"type": "ping", "request_id": "rtt"})
ATTACKS = ("pings", "1MiB", "bad-json")


async def measure_pings(url: str, seconds: float) -> list[float]:
    """Round trips (ms) of a ping every 100 ms for `seconds`."""
    rtts: list[float] = []
    async with connect(url) as ws:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await ws.send(PING)
            while json.loads(await ws.recv()).get("request_id") != "rtt":
                pass
            rtts.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)  # 10 a second: well within the frame limit
    return rtts


async def abuse(url: str, attack: str, seconds: float) -> tuple[int | None, float | None]:
    """Run one attack for up to `seconds`: (close code, seconds until closed)."""
    started = time.monotonic()
    ws: ClientConnection = await connect(url, max_size=None, write_limit=2**20)
    reader = asyncio.create_task(_drain(ws))
    try:
        async with asyncio.timeout(seconds):
            while True:
                if attack == "pings":
                    for _ in range(19):
                        await ws.send(PING)
                    await asyncio.sleep(0.06)
                elif attack == "1MiB":
                    await ws.send(json.dumps({"type": "ping", "pad": "x" * (2**20 - 40)}))
                else:
                    await ws.send("{" * 65_536)
    except (ConnectionClosed, TimeoutError):
        pass
    finally:
        reader.cancel()
        await ws.close()
    closed_after = time.monotonic() - started if ws.close_code == 1008 else None
    return ws.close_code, closed_after


async def _drain(ws: ClientConnection) -> None:
    """Read what the server answers, so that the abuser is not also a slow reader."""
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


def stats(rtts: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(rtts, 50), 2),
        "p99_ms": round(percentile(rtts, 99), 2),
        "max_ms": round(max(rtts), 2),
        "pings": len(rtts),
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cortex-flood-") as folder:
        workdir = Path(folder)
        async with children() as started:
            server = await start_cortex(
                workdir, "http://127.0.0.1:9/v1", {"CORTEX_USE_MOCK": "true"}
            )
            started.append(server)
            assert server.url is not None
            cpu = proc_cpu_seconds(server.pid)
            rows.append({"attack": "none", **stats(await measure_pings(server.url, args.seconds))})
            rows[-1]["server_cpu_s"] = round(proc_cpu_seconds(server.pid) - cpu, 2)
            for attack in ATTACKS:
                cpu = proc_cpu_seconds(server.pid)
                attacker = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--abuse",
                    attack,
                    server.url,
                    str(args.seconds),
                    stdout=asyncio.subprocess.PIPE,
                )
                rtts = await measure_pings(server.url, args.seconds)
                out, _ = await attacker.communicate()
                code, closed_after = json.loads(out)
                rows.append(
                    {
                        "attack": attack,
                        **stats(rtts),
                        "abuser_close_code": code,
                        "closed_after_s": round(closed_after, 2) if closed_after else None,
                        "server_cpu_s": round(proc_cpu_seconds(server.pid) - cpu, 2),
                    }
                )
    return {"bench": "flood", "machine": machine(), "seconds": args.seconds, "rows": rows}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"flood  cortex {report['machine']['cortex_commit']}  other client pings every 100 ms for "
        f"{report['seconds']:g} s per attack; target p99 < 10 ms",
        "",
        f"{'attack':<10} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'pings':>6} "
        f"{'abuser':>7} {'closed after':>13} {'server CPU s':>13}",
    ]
    for row in report["rows"]:
        closed = row.get("closed_after_s")
        lines.append(
            f"{row['attack']:<10} {row['p50_ms']:>7} {row['p99_ms']:>7} {row['max_ms']:>7} "
            f"{row['pings']:>6} {row.get('abuser_close_code') or '-':>7} "
            f"{(f'{closed} s' if closed else '-'):>13} {row['server_cpu_s']:>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per attack")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    parser.add_argument(
        "--abuse", nargs=3, metavar=("ATTACK", "URL", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.abuse:  # the abuser runs in a process of its own, so it slows no measuring client
        attack, url, seconds = args.abuse
        print(json.dumps(asyncio.run(abuse(url, attack, float(seconds)))))
        return 0
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
