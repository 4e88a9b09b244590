"""Fan-out: one conversation, 1 / 100 / 1,000 subscribers, one long reply; in one run.

    .venv/bin/python bench/fanout.py [--subscribers 1 100 1000] [--tokens 1000] [--repeat 3]
                                     [--chunk-delay 0 0.002] [--workers 4] [--profile 1000]
                                     [--json]

Processes, all on 127.0.0.1: a fake OpenAI-compatible provider (cortex.testing's, answering
the prompt "words=N" with N one-word chunks, no delay), a `cortex serve` process on a fresh
SQLite file, this script (the sender), and `--workers` client processes that hold the
subscribers (bench/_swarm.py: a lean WebSocket client, so that 1,000 subscribers cost the
2-core machine little beside the server).

For each subscriber count S and provider pace (--chunk-delay: 0 = the whole reply at once,
as fast as LiteLLM parses it; 0.002 = 500 chunks/s, so that the server relays chunk by chunk):
S connections subscribe to a new conversation; the sender posts "words=N delay=D" to it,
unsubscribes once acknowledged, and the clock runs from the send until the last subscriber
has the final stored assistant message. Printed per S (median of --repeat):
that time, the median subscriber's, the first delta's, wire bytes and frames per subscriber,
the server's CPU for the reply and per frame sent, and the ratio of each time to S=1's
(target: S=1,000 within 3x of S=1). Bytes per subscriber must grow with the reply's length,
not its square: at the smallest S the script also streams N/4 and N/2 words and prints the
growth. A subscriber the server drops (a slow reader, closed 1013) is counted, not waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    ForeignLoad,
    children,
    machine,
    median,
    print_report,
    proc_cpu_seconds,
    proc_status,
    raise_fd_limit,
    server_settings,
    start_cortex,
    start_fake_provider,
)
from _swarm import Profiler, RawWs, Swarm, open_ws

from cortex.testing.processes import Child, log_problems

TIMEOUT = 180.0
SERVER_SETTINGS = {
    "CORTEX_MAX_CONNECTIONS": "50000",
    "CORTEX_RATE_PER_S": "100000",
    "CORTEX_RATE_BURST": "100000",
}


@dataclass
class Run:
    """One reply to S subscribers."""

    subscribers: int
    tokens: int
    chunk_delay: float
    last_s: float  # send -> the last subscriber has the final message
    median_s: float  # send -> the median subscriber has it
    first_delta_s: float  # send -> the median subscriber's first delta
    bytes_per_sub: float  # median wire bytes (frame headers included) per subscriber
    frames_per_sub: float
    deltas_per_sub: float
    reply_chars: int
    complete: int  # subscribers that got the final message, status complete
    dropped: int  # closed by the server, or never got it
    server_cpu_s: float
    clients_cpu_s: float


@dataclass
class Row:
    subscribers: int
    chunk_delay: float
    runs: list[Run] = field(default_factory=list)

    def med(self, name: str) -> float:
        return float(statistics.median(float(getattr(r, name)) for r in self.runs))


async def one_reply(
    sender: RawWs,
    swarm: Swarm,
    server: Child,
    subscribers: int,
    tokens: int,
    delay: float,
    spy: Profiler | None = None,
) -> Run:
    # A conversation with one short exchange, so that the timed send is a plain follow-up.
    await sender.converse("words=1", TIMEOUT)
    conversation = str(sender.conversation_id)
    acks = await swarm.each("subscribe", TIMEOUT, conversation_id=conversation, timeout=60.0)
    acked = sum(a["acked"] for a in acks)
    if acked != subscribers:
        raise RuntimeError(f"{acked} of {subscribers} subscribers were acknowledged")
    await asyncio.sleep(0.2)  # let the subscribe traffic settle before the clock starts
    if spy is not None:
        await spy.__aenter__()  # the reply only, not the subscribing
    cpu0 = proc_cpu_seconds(server.pid)
    clients0 = sum(proc_cpu_seconds(p) for p in swarm.pids)
    sender.reset()
    t0 = time.monotonic()
    await sender.request(
        {
            "type": "send",
            "conversation_id": conversation,
            "content": f"words={tokens} delay={delay}",
        },
        TIMEOUT,
    )
    sender.send_json({"type": "unsubscribe", "conversation_id": conversation})
    results = await swarm.each("await_final", TIMEOUT + 10, timeout=TIMEOUT)
    rows = [r for result in results for r in result["subscribers"]]
    server_cpu = proc_cpu_seconds(server.pid) - cpu0
    clients_cpu = sum(proc_cpu_seconds(p) for p in swarm.pids) - clients0
    if spy is not None:
        await spy.__aexit__(None, None, None)
    done = [r for r in rows if r["status"] == "complete" and r["final"]]
    finals = [r["final"] - t0 for r in done]
    firsts = [r["first"] - t0 for r in done if r["first"]]
    return Run(
        subscribers=subscribers,
        tokens=tokens,
        chunk_delay=delay,
        last_s=max(finals, default=float("nan")),
        median_s=median(finals),
        first_delta_s=median(firsts),
        bytes_per_sub=median([float(r["bytes"]) for r in done]),
        frames_per_sub=median([float(r["frames"]) for r in done]),
        deltas_per_sub=median([float(r["deltas"]) for r in done]),
        reply_chars=max((r["chars"] for r in done), default=0),
        complete=len(done),
        dropped=len(rows) - len(done),
        server_cpu_s=server_cpu,
        clients_cpu_s=clients_cpu,
    )


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="cortex-fanout-") as tmp:
        workdir = Path(tmp)
        async with children() as started:
            fake = await start_fake_provider(
                [str(REPO / "bench" / "_swarm.py"), "provider", "--words", str(args.tokens)],
                workdir,
            )
            started.append(fake)
            server = await start_cortex(
                workdir, fake.url, {**SERVER_SETTINGS, **server_settings(args.set)}
            )
            started.append(server)
            swarm = await Swarm.start(args.workers, workdir)
            sender = await open_ws(server.url)
            idle_rss = proc_status(server.pid).get("VmRSS", 0)
            ours0 = time.process_time() + sum(
                proc_cpu_seconds(p) for p in (fake.pid, server.pid, *swarm.pids)
            )
            foreign = ForeignLoad()
            rows: list[Row] = []
            scaling: list[Run] = []
            profile: list[str] = []
            try:
                for count in args.subscribers:
                    opened = await swarm.split(
                        "connect",
                        count,
                        TIMEOUT,
                        url=server.url,
                        parallel=25,
                        offer_deflate=False,
                        timeout=60.0,
                    )
                    if sum(o["opened"] for o in opened) != count:
                        raise RuntimeError(f"could not open {count} connections: {opened}")
                    # Warm-up, not counted: first-call costs of LiteLLM and of the server.
                    await one_reply(sender, swarm, server, count, min(args.tokens, 50), 0.0)
                    for delay in args.chunk_delay:
                        row = Row(count, delay)
                        for _ in range(args.repeat):
                            row.runs.append(
                                await one_reply(sender, swarm, server, count, args.tokens, delay)
                            )
                        if count == args.profile:  # one more reply, profiled, not counted
                            spy = Profiler(server.pid, workdir / f"profile-{delay}.txt")
                            await one_reply(sender, swarm, server, count, args.tokens, delay, spy)
                            pace = "no delay" if delay == 0 else f"{delay * 1000:g} ms"
                            profile += [f"S={count}, pace {pace}:", *spy.top(args.profile_lines)]
                        rows.append(row)
                    if count == min(args.subscribers):
                        for tokens in (args.tokens // 4, args.tokens // 2, args.tokens):
                            scaling.append(
                                await one_reply(
                                    sender, swarm, server, count, tokens, args.chunk_delay[-1]
                                )
                            )
                    await swarm.each("close", TIMEOUT, timeout=10.0)
                    await asyncio.sleep(0.5)
                ours = time.process_time() + sum(
                    proc_cpu_seconds(p) for p in (fake.pid, server.pid, *swarm.pids)
                )
            finally:
                await sender.close()
                await swarm.stop()
            other_cpu = foreign.fraction(ours - ours0)
            status = proc_status(server.pid)
            code = await server.stop()
            problems, lines = log_problems(server.log_path)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "tokens": args.tokens,
        "repeat": args.repeat,
        "workers": args.workers,
        "settings": args.set,
        "fd_limit": fd_limit,
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "rows": [
            {
                "subscribers": r.subscribers,
                "chunk_delay": r.chunk_delay,
                "runs": [asdict(x) for x in r.runs],
            }
            for r in rows
        ],
        "scaling": [asdict(x) for x in scaling],
        "profile": profile,
        "server": {
            "idle_rss_kib": idle_rss,
            "rss_kib": status.get("VmRSS", 0),
            "peak_rss_kib": status.get("VmHWM", 0),
            "exit_code": code,
            "log_errors": problems,
            "log_error_lines": lines,
        },
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"fanout  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m.get('litellm', '?')}, websockets {m.get('websockets', '?')}, "
        f"cortex {m.get('cortex_commit', '?')}",
        f"one conversation, a {report['tokens']}-token reply (one word per chunk), median of "
        f"{report['repeat']} repeats; subscribers in {report['workers']} client processes; "
        f"other processes used {report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile"
        + (f"; server settings: {' '.join(report['settings'])}" if report["settings"] else ""),
    ]
    rows = [
        Row(r["subscribers"], r["chunk_delay"], [Run(**x) for x in r["runs"]])
        for r in report["rows"]
    ]
    for delay in sorted({r.chunk_delay for r in rows}):
        group = sorted((r for r in rows if r.chunk_delay == delay), key=lambda r: r.subscribers)
        pace = "no delay" if delay == 0 else f"{delay * 1000:g} ms between chunks"
        out += [
            "",
            f"provider pace: {pace}",
            f"{'subs':>5} {'last s':>7} {'median s':>8} {'1st delta ms':>12} {'x S=1':>6} "
            f"{'bytes/sub':>10} {'frames/sub':>10} {'srv CPU s':>9} {'us/sub/chunk':>12} "
            f"{'clients CPU s':>13} {'dropped':>7}",
        ]
        base = group[0].med("last_s")
        for row in group:
            # The server CPU that each subscriber beyond the first adds, per chunk of the reply.
            extra = row.subscribers - group[0].subscribers
            marginal = (
                (row.med("server_cpu_s") - group[0].med("server_cpu_s"))
                / (extra * report["tokens"])
                * 1e6
                if extra
                else float("nan")
            )
            out.append(
                f"{row.subscribers:>5} {row.med('last_s'):>7.3f} {row.med('median_s'):>8.3f} "
                f"{row.med('first_delta_s') * 1000:>12.1f} {row.med('last_s') / base:>6.2f} "
                f"{row.med('bytes_per_sub'):>10.0f} {row.med('frames_per_sub'):>10.0f} "
                f"{row.med('server_cpu_s'):>9.2f} "
                f"{marginal:>12.2f} "
                f"{row.med('clients_cpu_s'):>13.2f} {max(r.dropped for r in row.runs):>7}"
            )
        if len(group) > 1:
            last = group[-1]
            ratio = last.med("last_s") / base
            out.append(
                f"ratio S={last.subscribers} / S={group[0].subscribers}: {ratio:.2f}x "
                f"(target <= 3x: {'met' if ratio <= 3 else 'NOT met'})"
            )
    scaling = [Run(**x) for x in report["scaling"]]
    if scaling:
        a, b = scaling[0], scaling[-1]
        pace = "no delay" if a.chunk_delay == 0 else f"{a.chunk_delay * 1000:g} ms"
        out += ["", f"bytes per subscriber by reply length (S={a.subscribers}, pace {pace}):"]
        for run in scaling:
            out.append(
                f"  {run.tokens:>5} tokens, {run.reply_chars:>6} chars: "
                f"{run.bytes_per_sub:>8.0f} bytes, {run.bytes_per_sub / run.reply_chars:.1f} "
                f"bytes/char, {run.frames_per_sub:.0f} frames"
            )
        growth = b.bytes_per_sub / a.bytes_per_sub
        length = b.reply_chars / a.reply_chars
        out.append(
            f"  reply {length:.2f}x longer -> bytes {growth:.2f}x "
            f"(linear: {length:.2f}x, quadratic: {length**2:.1f}x)"
        )
    if report["profile"]:
        out += ["", "server profile (py-spy) of one extra reply (not in the table):"]
        out += [f"  {line}" for line in report["profile"]]
    s = report["server"]
    out += [
        "",
        f"cortex server RSS: idle {s['idle_rss_kib'] / 1024:.0f} MiB, at the end "
        f"{s['rss_kib'] / 1024:.0f} MiB, peak (VmHWM) {s['peak_rss_kib'] / 1024:.0f} MiB; "
        f"exit code {s['exit_code']}, error lines in its log: {s['log_errors']}",
    ]
    out += [f"  {line}" for line in s["log_error_lines"]]
    out += [
        "",
        "last/median s: from the send to the final stored message at the last/median",
        "subscriber; bytes: WebSocket wire bytes a subscriber received for the reply; srv CPU:",
        "the server process's CPU over the reply (10 ms clock resolution); us/sub/chunk: the",
        "server CPU each subscriber beyond the first adds, per chunk of the reply.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 100, 1000], metavar="S")
    parser.add_argument("--tokens", type=int, default=1000, help="chunks in the reply")
    parser.add_argument("--repeat", type=int, default=3, help="timed replies per S")
    parser.add_argument(
        "--chunk-delay",
        type=float,
        nargs="+",
        default=[0.0, 0.002],
        metavar="D",
        help="seconds between the provider's chunks (each value is a run of its own)",
    )
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="S",
        help="py-spy the server during one extra reply to S subscribers (each pace)",
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
    args.subscribers = sorted(set(args.subscribers))
    if min(args.subscribers) < 1 or args.tokens < 4 or args.repeat < 1 or args.workers < 1:
        parser.error("--subscribers, --repeat and --workers must be positive, --tokens >= 4")
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0 if report["server"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
