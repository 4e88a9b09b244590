"""Soak: many clients chatting at once, dropping, coming back and cancelling; then check storage.

    .venv/bin/python bench/soak.py [--clients 200] [--seconds 60] [--seed 1] [--json]

Processes (all on 127.0.0.1): a fake OpenAI-compatible provider (this script in provider
mode: replies of a few dozen words, a few ms to tens of ms apart, some answered with 429 or
500, cut mid-stream or stalled), a `cortex serve` process on a fresh SQLite file, and this
script with every client in one event loop.

The clients, and the storage check after the run, are cortex.testing.soak's (the module's
docstring says what each client does and what is checked); tests/test_soak.py runs a short
soak against them too. This script runs the long one: after `--seconds`, the server gets
SIGTERM while the clients are still busy (a graceful shutdown under load). Then the SQLite
file is read directly and checked against what the clients sent, were acknowledged and were
told (`check_database`): every acknowledged message stored once as acknowledged, no reply
left streaming, every reply the provider's text for its message (whole or a prefix), what
clients were told is what is stored, seq unique and increasing. Besides, the server must
exit 0 with no ERROR or traceback in its log, in time.
It prints the counts, latencies, the server's peak RSS and the error rates, and exits 1 if a
check failed (2 for a problem of the harness itself).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    ForeignLoad,
    children,
    machine,
    percentile,
    print_report,
    proc_cpu_seconds,
    proc_fd_count,
    proc_status,
    raise_fd_limit,
    server_settings,
    start_cortex,
    start_fake_provider,
)

from cortex.testing.processes import log_problems
from cortex.testing.soak import Crowd, Ledger, Plan, ProviderPlan, check_database, soak_responder

EXIT_MARGIN = 15.0  # Router.drain waits `grace`, then up to 10 s for the replies it cancelled


def provider_plan(args: argparse.Namespace) -> ProviderPlan:
    return ProviderPlan(
        words=(args.words[0], args.words[1]),
        chunk_delay=(args.chunk_delay[0], args.chunk_delay[1]),
        first_delay=(args.first_delay[0], args.first_delay[1]),
        fail_429=args.fail_429,
        fail_500=args.fail_500,
        fail_cut=args.fail_cut,
        fail_stall=args.fail_stall,
    )


async def provider_process(args: argparse.Namespace) -> None:
    """Provider mode: serve scripted, partly failing replies until SIGTERM; print stats."""
    from cortex.testing.fake_openai import FakeOpenAI, serve_until_signalled

    fake = FakeOpenAI()
    fake.responder, stats = soak_responder(provider_plan(args), args.seed)
    try:
        await serve_until_signalled(fake)
    finally:
        print("STATS " + json.dumps(dict(stats)), flush=True)


# ------------------------------------------------------------------------------ the run


@dataclass
class Sampler:
    """Polls the server process: peak RSS, open descriptors, CPU."""

    pid: int
    peak_rss_kib: int = 0
    peak_fds: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            status = proc_status(self.pid)
            if not status:
                return
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmHWM", 0))
            fds = proc_fd_count(self.pid)
            self.peak_fds = max(self.peak_fds, fds)
            self.samples.append((time.monotonic(), status.get("VmRSS", 0), fds))
            await asyncio.sleep(0.5)


def provider_argv(args: argparse.Namespace) -> list[str]:
    return [
        str(Path(__file__).resolve()),
        "--provider-process",
        "--seed",
        str(args.seed),
        "--words",
        *map(str, args.words),
        "--chunk-delay",
        *map(str, args.chunk_delay),
        "--first-delay",
        *map(str, args.first_delay),
        "--fail-429",
        str(args.fail_429),
        "--fail-500",
        str(args.fail_500),
        "--fail-cut",
        str(args.fail_cut),
        "--fail-stall",
        str(args.fail_stall),
    ]


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fd_limit = raise_fd_limit()  # children inherit it
    ledger = Ledger()
    plan = Plan(
        lost_ack=args.p_lost_ack,
        drop=args.p_drop,
        cancel=args.p_cancel,
        duplicate=args.p_duplicate,
        new_conversation=args.p_new_conversation,
        think=(args.think[0], args.think[1]),
    )
    async with children() as started:
        fake = await start_fake_provider(provider_argv(args), workdir, name="provider")
        started.append(fake)
        server = await start_cortex(
            workdir,
            fake.url,
            {
                "CORTEX_NUM_RETRIES": str(args.num_retries),
                "CORTEX_STREAM_IDLE_TIMEOUT": str(args.idle_timeout),
                "CORTEX_SHUTDOWN_GRACE_S": str(args.grace),
                **server_settings(args.set),
            },
        )
        started.append(server)
        idle_rss = proc_status(server.pid).get("VmRSS", 0)
        sampler = Sampler(server.pid)
        sampling = asyncio.create_task(sampler.run())
        crowd = Crowd(
            server.url,
            plan,
            ledger,
            clients=args.clients,
            seed=args.seed,
            watchers=args.watchers,
            max_messages=args.max_messages,
            ramp=min(5.0, args.seconds / 4),
        )
        cpu0 = proc_cpu_seconds(server.pid)
        own0 = time.process_time()
        ours0 = own0 + cpu0 + proc_cpu_seconds(fake.pid)
        foreign = ForeignLoad()
        started_at = time.monotonic()
        crowd.start()
        await asyncio.sleep(args.seconds)
        # Graceful shutdown while the clients are still busy.
        crowd.wind_down()
        sigterm_at = time.monotonic()
        cpu_before_stop = proc_cpu_seconds(server.pid)
        own_cpu = time.process_time() - own0
        provider_cpu = proc_cpu_seconds(fake.pid)
        ours_before_stop = own0 + own_cpu + cpu_before_stop + provider_cpu
        peak_before_stop = proc_status(server.pid).get("VmHWM", 0)
        code = await server.stop(timeout=args.grace + 60)
        stop_s = time.monotonic() - sigterm_at
        if stop_s >= args.grace + 60:
            ledger.violation(f"the server did not exit within {args.grace + 60:g} s of SIGTERM")
        await crowd.join(timeout=15)
        sampling.cancel()
        await fake.stop()
        assert fake.proc.stdout is not None
        tail = (await fake.proc.stdout.read()).decode()
        provider_stats: dict[str, int] = next(
            (json.loads(line[6:]) for line in tail.splitlines() if line.startswith("STATS ")), {}
        )
        other_cpu = foreign.fraction(ours_before_stop - ours0)
    duration = sigterm_at - started_at
    log_errors, log_lines = log_problems(server.log_path)
    db = check_database(workdir / "cortex.db", ledger, provider_plan(args).words)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "provider_process"},
        "fd_limit": fd_limit,
        "duration_s": round(duration, 1),
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "clients": dict(ledger.counts),
        "error_events": dict(ledger.errors),
        "unexpected_closes": dict(ledger.closes),
        "violations": ledger.violations,
        "latency_ms": {
            name: {
                "n": len(values),
                "p50": round(percentile(values, 50), 1),
                "p95": round(percentile(values, 95), 1),
                "p99": round(percentile(values, 99), 1),
                "max": round(max(values), 1) if values else None,
            }
            for name, values in ledger.latency.items()
        },
        "provider_requests": provider_stats,
        "clients_cpu_fraction_of_one_core": round(own_cpu / duration, 3),
        "provider_cpu_fraction_of_one_core": round(
            (provider_cpu - (ours0 - own0 - cpu0)) / duration, 3
        ),
        "server": {
            "idle_rss_kib": idle_rss,
            "peak_rss_kib": max(sampler.peak_rss_kib, peak_before_stop),
            "peak_fds": sampler.peak_fds,
            "cpu_s": round(cpu_before_stop - cpu0, 1),
            "cpu_fraction_of_one_core": round((cpu_before_stop - cpu0) / duration, 3),
            "exit_code": code,
            "stop_s": round(stop_s, 2),
            "log_errors": log_errors,
            "log_error_lines": log_lines,
        },
        "database": db,
    }


def failures(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if report["violations"]:
        out.append(f"{len(report['violations'])} protocol violations seen by clients")
    if report["database"]["problems"]:
        out.append(f"{report['database']['counts'].get('failed_checks')} storage checks failed")
    server = report["server"]
    if server["exit_code"] != 0:
        out.append(f"server exit code {server['exit_code']}")
    if server["log_errors"]:
        out.append(f"{server['log_errors']} error lines in the server log")
    limit = report["args"]["grace"] + EXIT_MARGIN
    if server["stop_s"] > limit:
        out.append(
            f"the server took {server['stop_s']:.1f} s to exit after SIGTERM "
            f"(grace {report['args']['grace']:g} s, allowed {limit:g} s)"
        )
    if report["clients"].get("acks", 0) == 0:
        out.append("no message was acknowledged at all")
    return out


def warnings(report: dict[str, Any]) -> list[str]:
    """Outcomes that break no check of this script but that a user would notice."""
    db: Counter[str] = Counter(report["database"]["counts"])
    c: Counter[str] = Counter(report["clients"])
    out: list[str] = []
    if db["acknowledged_without_reply"]:
        out.append(f"{db['acknowledged_without_reply']} acknowledged messages never answered")
    silent = c["cancel_then_no_final_message"] + c["cancel_then_silence"]
    if silent:
        out.append(f"{silent} cancelled replies ended with no final message")
    return out


def render(report: dict[str, Any]) -> str:
    c: Counter[str] = Counter(report["clients"])
    db: Counter[str] = Counter(report["database"]["counts"])
    s = report["server"]
    m = report["machine"]
    a = report["args"]
    replies = sum(v for k, v in c.items() if k.startswith("reply_"))
    provider = Counter(report["provider_requests"])
    provider_total = sum(provider.values())

    def rate(n: int, total: int) -> str:
        return f"{n} ({n / total:.1%})" if total else str(n)

    out = [
        f"soak  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m['litellm']}, cortex {m['cortex_commit']}",
        f"{a['clients']} clients for {report['duration_s']} s (seed {a['seed']}), think "
        f"{a['think'][0]:g}-{a['think'][1]:g} s, replies {a['words'][0]}-{a['words'][1]} words "
        f"{a['chunk_delay'][0] * 1000:g}-{a['chunk_delay'][1] * 1000:g} ms apart; other "
        f"processes used {report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile",
        "",
        "clients",
        f"  sends {c['sends']}, acks {c['acks']}, re-acks {c['reacks']}, send refused "
        f"{sum(v for k, v in c.items() if k.startswith('send_refused'))}",
        f"  connections {c['connections']} (+{c['watchers']} watchers), drops mid-reply "
        f"{c['drops_mid_reply']}, drops before ack {c['drops_before_ack']}, resends after "
        f"lost ack {c['resends_after_lost_ack']}, duplicate resends {c['duplicate_resends']}",
        f"  cancels {c['cancels']} -> cancelled {c['cancel_then_cancelled']}, complete "
        f"{c['cancel_then_complete']}, error {c['cancel_then_error']}, typing off with no "
        f"final message {c['cancel_then_no_final_message']}, silence "
        f"{c['cancel_then_silence']}",
        f"  replies seen {replies}: complete {rate(c['reply_complete'], replies)}, cancelled "
        f"{rate(c['reply_cancelled'], replies)}, error {rate(c['reply_error'], replies)}, "
        f"interrupted {rate(c['reply_interrupted'], replies)}",
        f"  error events {report['error_events'] or {}}; unexpected closes "
        f"{report['unexpected_closes'] or {}}; closed by shutdown {c['closed_by_shutdown']}",
        f"  other: { {k: v for k, v in c.items() if k.startswith(('connect_', 'deltas_'))} }",
    ]
    for name, q in report["latency_ms"].items():
        out.append(
            f"  {name:<15} n={q['n']:<6} p50 {q['p50']:>7} p95 {q['p95']:>7} p99 {q['p99']:>7} "
            f"max {q['max']}"
        )
    out += [
        "provider",
        "  requests "
        + ", ".join(f"{k} {rate(v, provider_total)}" for k, v in sorted(provider.items()))
        + f"; CPU {report['provider_cpu_fraction_of_one_core']:.0%} of one core (the clients: "
        f"{report['clients_cpu_fraction_of_one_core']:.0%})",
        "server",
        f"  RSS idle {s['idle_rss_kib'] / 1024:.0f} MiB, peak (VmHWM) "
        f"{s['peak_rss_kib'] / 1024:.0f} MiB; peak open fds {s['peak_fds']}; CPU "
        f"{s['cpu_s']} s ({s['cpu_fraction_of_one_core']:.0%} of one core)",
        f"  SIGTERM -> exit {s['exit_code']} in {s['stop_s']} s; error lines in log "
        f"{s['log_errors']}",
    ]
    out += [f"    {line}" for line in s["log_error_lines"][:10]]
    statuses = ", ".join(
        f"{k} {v}" for k, v in sorted(db.items()) if k.startswith(("user:", "assistant:"))
    )
    codes = ", ".join(
        f"{k.split(':')[1]} {v}" for k, v in sorted(db.items()) if k.startswith("error_code:")
    )
    out += [
        "database",
        f"  {db['conversations']} conversations, {db['messages']} messages: {statuses}; "
        f"error codes: {codes or 'none'}",
        f"  acknowledged messages checked {db['acknowledged_checked']}, stored but never "
        f"acknowledged {db['stored_not_acknowledged']}, conversations with seq gaps "
        f"{db['conversations_with_seq_gaps']}",
        f"  unanswered user messages: acknowledged {db['acknowledged_without_reply']}, after a "
        f"cancel {db['unanswered_after_cancel']}, never acknowledged "
        f"{db['unanswered_not_acknowledged']}; cancels that ended with no reply row and no "
        f"final message {db['cancel_before_reply_row']}",
        "  replies without text: "
        + (
            ", ".join(
                f"{k.split(':')[1]} {v}"
                for k, v in sorted(db.items())
                if k.startswith("replies_without_text")
            )
            or "none"
        ),
    ]
    if report["database"]["acknowledged_unanswered"]:
        out.append(
            "  acknowledged, never answered, no cancel: "
            f"{report['database']['acknowledged_unanswered'][:10]}"
        )
    problems = report["violations"][:15] + report["database"]["problems"][:15]
    if problems:
        out.append("problems")
        out += [f"  {p}" for p in problems]
    failed = failures(report)
    out.append("")
    out.append("RESULT: " + ("FAIL: " + "; ".join(failed) if failed else "ok, every check passed"))
    noticed = warnings(report)
    if noticed:
        out.append("WARNINGS: " + "; ".join(noticed))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    plan, provider = Plan(), ProviderPlan()  # their defaults are the script's
    span = ("MIN", "MAX")
    p.add_argument("--think", type=float, nargs=2, default=list(plan.think), metavar=span)
    p.add_argument("--max-messages", type=int, default=1000, help="per client (a bound)")
    p.add_argument("--watchers", type=float, default=0.1, help="share of clients with a 2nd tab")
    p.add_argument(
        "--p-lost-ack", type=float, default=plan.lost_ack, help="drop right after a send"
    )
    p.add_argument("--p-drop", type=float, default=plan.drop, help="drop mid-reply")
    p.add_argument("--p-cancel", type=float, default=plan.cancel, help="cancel the reply")
    p.add_argument(
        "--p-duplicate", type=float, default=plan.duplicate, help="resend an acked message"
    )
    p.add_argument("--p-new-conversation", type=float, default=plan.new_conversation)
    p.add_argument("--words", type=int, nargs=2, default=list(provider.words), metavar=span)
    p.add_argument(
        "--chunk-delay", type=float, nargs=2, default=list(provider.chunk_delay), metavar=span
    )
    p.add_argument(
        "--first-delay", type=float, nargs=2, default=list(provider.first_delay), metavar=span
    )
    p.add_argument(
        "--fail-429", type=float, default=provider.fail_429, help="share of provider requests"
    )
    p.add_argument("--fail-500", type=float, default=provider.fail_500)
    p.add_argument(
        "--fail-cut", type=float, default=provider.fail_cut, help="connection cut mid-stream"
    )
    p.add_argument("--fail-stall", type=float, default=provider.fail_stall, help="stall mid-stream")
    p.add_argument("--num-retries", type=int, default=1, help="CORTEX_NUM_RETRIES")
    p.add_argument("--idle-timeout", type=float, default=2.0, help="CORTEX_STREAM_IDLE_TIMEOUT")
    p.add_argument("--grace", type=float, default=5.0, help="CORTEX_SHUTDOWN_GRACE_S")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CORTEX_X=V",
        help="a server setting (repeatable), e.g. CORTEX_LLM_FAST_PATH=0",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (db, logs)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    p.add_argument("--provider-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.think[0] <= 0:
        p.error("--clients, --seconds and the think time must be positive")
    if args.words[0] < 2 or args.words[1] < args.words[0]:
        p.error("--words MIN MAX with 2 <= MIN <= MAX")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.provider_process:
        asyncio.run(provider_process(args))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="cortex-soak-"))
    try:
        report = asyncio.run(asyncio.wait_for(soak(args, workdir), args.seconds + args.grace + 240))
    except Exception as exc:
        print(f"soak: the harness failed: {exc!r}; work directory {workdir}", file=sys.stderr)
        return 2
    failed = failures(report)
    report["result"] = {"ok": not failed, "failures": failed, "warnings": warnings(report)}
    keep = args.keep or bool(failed)
    report["workdir"] = str(workdir) if keep else None
    print_report(report, render(report), args.json)
    if keep:
        print(f"work directory kept: {workdir}", file=sys.stderr)
    else:
        _rmtree(workdir)
    return 1 if failed else 0


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
