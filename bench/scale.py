"""Scale-out: streamed replies through nginx to 1, 2 and 4 Cortex processes, in one run.
Long because it starts and checks a whole deployment (PostgreSQL, Redis, nginx, N servers).

    .venv/bin/python bench/scale.py [--procs 1,2,4] [--conversations 40] [--tokens 200]
                                    [--chunk-delay 0.005] [--stagger 0] [--check 8] [--json]

Processes, all on 127.0.0.1: a private PostgreSQL and Redis (cortex.testing.services), the
fake OpenAI-compatible provider (cortex.testing.fake_openai, its own process: --tokens
one-word chunks per reply, --chunk-delay apart), and per round N `cortex serve` processes on
a fresh PostgreSQL database sharing the Redis, behind nginx (bench/nginx.py: one worker,
plain round-robin, no sticky sessions). The WebSocket clients run in a client process of
their own (this script, `client` mode) so that they cost neither the servers nor the bench.

Each round: warm-up (two conversations per process, direct, not counted); then the client
process opens --conversations connections through nginx (so consecutive ones land on
consecutive processes), each sends the first message of a new conversation, all at once
(--stagger spreads the sends), and records the arrival time of every `delta` frame until the
reply's final `message`. Figures:

  chunks/s   reply chunks (words) delivered in delta text, over all streams, per second of
             the round (first send to the last final message); the ratio compares rounds
  frames/s   delta frames received per second of the round (fewer than chunks when a
             server merged the deltas of a lagging connection)
  gap        time between consecutive delta frames of one stream, over all streams
  1st        send to the first delta of the reply
  CPU        core-seconds per second of the round: all Cortex processes together (1.0 = one
             core busy), nginx, PostgreSQL + Redis, the fake provider, the client process

Correctness, checked in the run: every reply's deltas are contiguous (each offset where the
previous one ended) and spell the expected text, and its final message is complete with that
text; then (--check K conversations) a cross-process check: a watcher connected directly to
process i+1 subscribes to a conversation, the sender connected directly to process i sends a
second message in it, and both must receive the whole reply (one of the two only through
Redis); finally each conversation's history, read through nginx, must hold complete replies
with the expected text. Any failure, an error line in a server log, or a non-zero exit code
of a server makes the exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import (
    PROMPT,
    REPO,
    machine,
    machine_cpu,
    percentile,
    postmaster_pid,
    print_report,
    proc_status,
    process_table,
    raise_fd_limit,
    server_settings,
    start_cortex,
    start_fake_provider,
    tree_cpu,
)
from _swarm import Swarm, Worker, WorkerState, open_ws, reply_problem, scrape, serve_commands
from nginx import nginx_problems, start_nginx
from websockets.asyncio.client import ClientConnection, connect

from cortex.testing.processes import Child, log_problems
from cortex.testing.services import PostgresServer, RedisServer, free_port

SECOND_PROMPT = "And once more, please."
ROUND_TIMEOUT = 120.0  # the timed phase of one round
CHECK_TIMEOUT = 60.0  # the cross-process and history checks of one round
START_TIMEOUT = 90.0  # N servers starting together on 2 cores
WARMUP_PER_PROCESS = 2
_HERE = Path(__file__).resolve()


def expected_text(tokens: int) -> str:
    """What the fake provider streams for `--words tokens`: one chunk per word."""
    return " ".join(f"word{i}" for i in range(tokens))


# ----------------------------------------------------------------------- the client process


class ScaleClient(WorkerState):
    """The client process of a round (this script in `client` mode): a swarm worker with the
    round's warm-up and its cross-process and history checks besides."""

    async def op_warm(
        self, urls: list[str], per_url: int, expected: str, timeout: float
    ) -> dict[str, Any]:
        """`per_url` conversations on each server, directly: first-call costs, not counted."""

        async def one(url: str) -> str:
            ws = await open_ws(url, timeout=timeout)
            try:
                final = await ws.converse(PROMPT, timeout, keep_pieces=True)
                return reply_problem(ws.pieces or [], final, expected)
            finally:
                await ws.close()

        problems = await asyncio.gather(*(one(u) for u in urls for _ in range(per_url)))
        return {"problems": [p for p in problems if p]}

    async def op_check(
        self,
        urls: list[str],
        nginx_url: str,
        conversation_ids: list[str],
        k: int,
        expected: str,
        timeout: float,
    ) -> dict[str, Any]:
        """The cross-process check on the first `k` conversations, then every history."""
        cross = await asyncio.gather(
            *(
                _cross_check(urls[i % len(urls)], urls[(i + 1) % len(urls)], cid, expected, timeout)
                for i, cid in enumerate(conversation_ids[:k])
            )
        )
        history = await _history_check(nginx_url, conversation_ids, k, expected, timeout)
        return {"cross": list(cross), "history": history}


async def _until(
    ws: ClientConnection,
    events: list[dict[str, Any]],
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> None:
    """Receive (websockets client) into `events` until `done(event)` is true."""
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if done(event):
                return


def _final_of(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    for event in events:
        message = event.get("message") or {}
        if (
            event.get("type") == "message"
            and message.get("role") == "assistant"
            and message.get("status") != "streaming"
        ):
            return message
    return None


def _reply_problem(events: list[dict[str, Any]], expected: str) -> str:
    final = _final_of(events)
    if final is None:
        errors = [e for e in events if e.get("type") == "error"]
        return f"no final message{f' (error: {errors[0]})' if errors else ''}"
    pieces = [
        (int(e["offset"]), str(e["text"]))
        for e in events
        if e.get("type") == "delta" and e.get("message_id") == final["id"]
    ]
    return reply_problem(pieces, final, expected)


async def _cross_check(
    sender_url: str, watcher_url: str, conversation_id: str, expected: str, timeout: float
) -> dict[str, Any]:
    """The watcher (on one process) subscribes; the sender (on another) sends a second
    message; both must get the whole reply."""

    def is_final(event: dict[str, Any]) -> bool:
        return event.get("type") == "error" or _final_of([event]) is not None

    problems: list[str] = []
    try:
        async with (
            connect(sender_url, open_timeout=timeout, max_size=None) as sender,
            connect(watcher_url, open_timeout=timeout, max_size=None) as watcher,
        ):
            watched: list[dict[str, Any]] = []
            await watcher.send(
                json.dumps({"type": "subscribe", "conversation_id": conversation_id})
            )
            await _until(watcher, watched, lambda e: e.get("type") in ("ack", "error"), timeout)
            if watched[-1].get("type") == "error":
                raise RuntimeError(f"subscribe refused: {watched[-1]}")
            watched.clear()
            sent: list[dict[str, Any]] = []
            await sender.send(
                json.dumps(
                    {"type": "send", "conversation_id": conversation_id, "content": SECOND_PROMPT}
                )
            )
            await asyncio.gather(
                _until(sender, sent, is_final, timeout), _until(watcher, watched, is_final, timeout)
            )
            for who, events in (("sender", sent), ("watcher", watched)):
                problem = _reply_problem(events, expected)
                if problem:
                    problems.append(f"{who}: {problem}")
    except (OSError, TimeoutError, RuntimeError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    return {"sender": sender_url, "watcher": watcher_url, "problems": problems}


async def _history_check(
    url: str, conversation_ids: list[str], k: int, expected: str, timeout: float
) -> dict[str, Any]:
    """Every conversation's stored messages, read through nginx: 1 user message and one
    complete reply with the expected text (2 of each for the first `k`)."""
    problems: list[str] = []
    async with connect(url, open_timeout=timeout, max_size=None) as ws:
        for i, cid in enumerate(conversation_ids):
            events: list[dict[str, Any]] = []
            await ws.send(json.dumps({"type": "history", "conversation_id": cid}))
            await _until(ws, events, lambda e: e.get("type") in ("history", "error"), timeout)
            if events[-1]["type"] == "error":
                problems.append(f"{cid}: {events[-1]}")
                continue
            messages = events[-1]["messages"]
            users = [m for m in messages if m["role"] == "user"]
            replies = [m for m in messages if m["role"] == "assistant"]
            want = 2 if i < k else 1
            if len(users) != want or len(replies) != want:
                problems.append(f"{cid}: {len(users)} user / {len(replies)} assistant messages")
            for reply in replies:
                if reply["status"] != "complete" or reply["content"] != expected:
                    problems.append(
                        f"{cid}: stored reply {reply['status']}, {len(reply['content'])} chars"
                    )
    return {"checked": len(conversation_ids), "problems": problems}


# ---------------------------------------------------------------------------- the bench


async def _server_counts(urls: Sequence[str]) -> list[tuple[int, int]]:
    """(open connections, replies so far) of each Cortex process, from its /metrics."""
    counts = []
    for url in urls:
        samples = await scrape(url)
        connections = int(samples.get(("cortex_connections_open", ""), -1))
        replies = sum(v for (name, _), v in samples.items() if name == "cortex_replies_total")
        counts.append((connections, int(replies)))
    return counts


def _redis_flushall(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(b"FLUSHALL\r\n")
        if not sock.recv(64).startswith(b"+OK"):
            raise RuntimeError("Redis FLUSHALL failed")


@dataclass
class Round:
    procs: int
    conversations: int
    completed: int
    chunks: int  # delivered, over all streams
    chunks_per_s: float
    frames_per_s: float
    gap_p50_ms: float
    gap_p99_ms: float
    first_p50_ms: float
    first_p99_ms: float
    wall_s: float
    cpu: dict[str, float]  # core-seconds per second of the round, per group of processes
    other_cpu: float  # fraction of the machine's CPU used by processes not ours
    steal: float  # fraction of the machine's CPU taken by the hypervisor
    cortex_cpu_ms_per_chunk: float
    connections: list[int]  # open connections of each Cortex process before the timed phase
    replies: list[int]  # replies each Cortex process ran in the timed phase
    rss_peak_kib: list[int]  # VmHWM of each Cortex process after the timed phase
    problems: list[str] = field(default_factory=list)  # replies that were not right
    cross_checked: int = 0
    cross_failed: int = 0
    cross_problems: list[str] = field(default_factory=list)
    history_checked: int = 0
    history_problems: list[str] = field(default_factory=list)
    server_exit_codes: list[int | None] = field(default_factory=list)
    log_errors: int = 0
    log_error_lines: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        return (
            self.completed == self.conversations
            and not self.problems
            and not self.cross_problems
            and not self.history_problems
        )


def summarize(procs: int, streams: list[dict[str, Any]]) -> dict[str, Any]:
    gaps: list[float] = []
    for s in streams:
        times = s["times_us"]
        gaps.extend((b - a) / 1000 for a, b in zip(times, times[1:], strict=False))
    firsts = [(s["first"] - s["sent"]) * 1000 for s in streams if s["first"]]
    start = min(s["sent"] for s in streams)
    end = max(s["final"] or s["sent"] for s in streams)
    wall = end - start
    chunks = sum(s["chunks"] for s in streams)
    frames = sum(len(s["times_us"]) for s in streams)
    return {
        "procs": procs,
        "conversations": len(streams),
        "completed": sum(1 for s in streams if not s["problem"]),
        "chunks": chunks,
        "chunks_per_s": chunks / wall if wall > 0 else float("nan"),
        "frames_per_s": frames / wall if wall > 0 else float("nan"),
        "gap_p50_ms": percentile(gaps, 50),
        "gap_p99_ms": percentile(gaps, 99),
        "first_p50_ms": percentile(firsts, 50),
        "first_p99_ms": percentile(firsts, 99),
        "wall_s": wall,
        "problems": [
            f"conversation {i} ({s['conversation_id']}): {s['problem']}"
            for i, s in enumerate(streams)
            if s["problem"]
        ],
    }


async def _start_servers(
    n: int, workdir: Path, api_base: str, settings: dict[str, str], started: list[Child]
) -> list[Child]:
    """N `cortex serve` processes started together (as a deployment would)."""
    folders = [workdir / f"cortex{k}" for k in range(n)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    results = await asyncio.gather(
        *(
            start_cortex(folder, api_base, settings, name=folder.name, timeout=START_TIMEOUT)
            for folder in folders
        ),
        return_exceptions=True,
    )
    servers: list[Child] = []
    failures: list[BaseException] = []
    for result in results:
        if isinstance(result, Child):
            servers.append(result)
        else:
            failures.append(result)
    started.extend(servers)
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} Cortex processes did not start: {failures[0]}")
    return servers


async def run_round(
    args: argparse.Namespace,
    index: int,
    n: int,
    workdir: Path,
    pg: PostgresServer,
    redis: RedisServer,
    fake: Child,
    expected: str,
) -> Round:
    database = await asyncio.to_thread(pg.create_database, f"scale_{index}_{n}")
    await asyncio.to_thread(_redis_flushall, redis.port)
    roundir = workdir / f"round{index}-{n}"
    settings = {
        "CORTEX_DATABASE_URL": database,
        "CORTEX_REDIS_URL": redis.url,
        "CORTEX_DEFAULT_MODEL": "openai/fake-model",
        "CORTEX_NUM_RETRIES": "0",
        "CORTEX_SHUTDOWN_GRACE_S": "1",
        "CORTEX_MAX_CONNECTIONS": "50000",
        **server_settings(args.set),
    }
    started: list[Child] = []
    client: Worker | None = None
    try:
        servers = await _start_servers(n, roundir, fake.url, settings, started)
        nginx = await start_nginx(
            roundir / "nginx", free_port(), [int(urlsplit(s.url).port or 0) for s in servers]
        )
        started.append(nginx)
        client = (await Swarm.start(1, roundir, argv=(str(_HERE), "client"))).workers[0]
        direct = [s.url for s in servers]
        warm = await client.call(
            "warm",
            ROUND_TIMEOUT,
            urls=direct,
            per_url=WARMUP_PER_PROCESS,
            expected=expected,
            timeout=60.0,
        )
        warm_problems = [f"warm-up: {p}" for p in warm["problems"]]
        opened = await client.call(
            "connect",
            60.0,
            url=nginx.url,
            n=args.conversations,
            parallel=10,
            offer_deflate=False,
            timeout=30.0,
        )
        if opened["opened"] != args.conversations:
            raise RuntimeError(f"could not open {args.conversations} connections: {opened}")
        server_pids = [s.pid for s in servers]
        groups = {
            "cortex": server_pids,
            "nginx": [nginx.pid],
            "pg+redis": [postmaster_pid(pg), getattr(getattr(redis, "_process", None), "pid", -1)],
            "provider": [fake.pid],
            "client": [client.pid],
            "bench": [],
        }
        counts0 = await _server_counts(direct)
        table0 = process_table()
        busy0, steal0, total0 = machine_cpu()
        t0 = time.monotonic()
        chat = await client.call(
            "chat",
            ROUND_TIMEOUT + 30,
            n=args.conversations,
            content=PROMPT,
            start_at=time.monotonic(),
            stagger=args.stagger,
            timeout=ROUND_TIMEOUT,
            expected=expected,
            tag="scale",
        )
        span = time.monotonic() - t0
        table1 = process_table()
        busy1, steal1, total1 = machine_cpu()
        counts1 = await _server_counts(direct)
        cpu = {
            name: (tree_cpu(pids, table1) - tree_cpu(pids, table0)) / span
            for name, pids in groups.items()
        }
        me = os.getpid()  # its own time only: every other group is a descendant of it
        cpu["bench"] = (table1[me].cpu - table0[me].cpu) / span
        ours = sum(cpu.values()) * span
        machine_span = total1 - total0
        other = max(0.0, (busy1 - busy0 - ours) / machine_span) if machine_span > 0 else 0.0
        steal = (steal1 - steal0) / machine_span if machine_span > 0 else 0.0
        rss = [proc_status(pid).get("VmHWM", 0) for pid in server_pids]
        streams = chat["streams"]
        summary = summarize(n, streams)
        conversation_ids = [s["conversation_id"] for s in streams if s["conversation_id"]]
        check = await client.call(
            "check",
            CHECK_TIMEOUT + 30,
            urls=direct,
            nginx_url=nginx.url,
            conversation_ids=conversation_ids,
            k=min(args.check, len(conversation_ids)),
            expected=expected,
            timeout=CHECK_TIMEOUT,
        )
        await client.call("close", 30.0, timeout=5.0)
        cross_problems = [
            f"sender {urlsplit(c['sender']).port} -> watcher {urlsplit(c['watcher']).port}: {p}"
            for c in check["cross"]
            for p in c["problems"]
        ]
        result = Round(
            **summary,
            cpu=cpu,
            other_cpu=other,
            steal=steal,
            cortex_cpu_ms_per_chunk=cpu["cortex"] * span * 1000 / max(1, summary["chunks"]),
            connections=[c for c, _ in counts0],
            replies=[b - a for (_, a), (_, b) in zip(counts0, counts1, strict=True)],
            rss_peak_kib=rss,
            cross_checked=len(check["cross"]),
            cross_failed=sum(1 for c in check["cross"] if c["problems"]),
            cross_problems=cross_problems,
            history_checked=check["history"]["checked"],
            history_problems=check["history"]["problems"],
        )
        result.problems = warm_problems + result.problems
    finally:
        if client is not None:
            await Swarm([client]).stop()
        codes: dict[str, int | None] = {}
        for child in reversed(started):
            with contextlib.suppress(Exception):
                codes[child.name] = await child.stop(timeout=15)
        started.clear()
    result.server_exit_codes = [codes.get(s.name) for s in servers]
    for server in servers:
        count, lines = log_problems(server.log_path, limit=10)
        result.log_errors += count
        result.log_error_lines += [f"{server.name}: {line}" for line in lines]
    count, lines = nginx_problems(nginx.log_path)
    result.log_errors += count
    result.log_error_lines += [f"nginx: {line}" for line in lines]
    return result


async def measure(args: argparse.Namespace) -> dict[str, Any]:

    raise_fd_limit()
    expected = expected_text(args.tokens)
    pg = PostgresServer()
    redis = RedisServer()
    rounds: list[Round] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(args.keep)  # made by main()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cortex-scale-")))
        fake: Child | None = None
        try:
            started = await asyncio.gather(
                asyncio.to_thread(pg.start), asyncio.to_thread(redis.start), return_exceptions=True
            )
            for outcome in started:
                if isinstance(outcome, BaseException):
                    raise outcome
            fake = await start_fake_provider(
                [
                    "-m",
                    "cortex.testing.fake_openai",
                    "--port",
                    "0",
                    "--words",
                    str(args.tokens),
                    "--chunk-delay",
                    str(args.chunk_delay),
                ],
                workdir,
            )
            for index, n in enumerate(args.procs):
                rounds.append(await run_round(args, index, n, workdir, pg, redis, fake, expected))
                await asyncio.sleep(0.5)
        finally:
            if fake is not None:
                await fake.stop()
            await asyncio.to_thread(redis.stop)
            await asyncio.to_thread(pg.stop)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "conversations": args.conversations,
        "tokens": args.tokens,
        "chars": len(expected),
        "chunk_delay_s": args.chunk_delay,
        "stagger_s": args.stagger,
        "settings": args.set,
        "rounds": [asdict(r) for r in rounds],
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    delay = report["chunk_delay_s"]
    n = report["conversations"]
    if delay:
        pace = (
            f"{delay * 1000:g} ms apart, i.e. {1 / delay:.0f} chunks/s per stream and "
            f"{n / delay:.0f} chunks/s offered in all"
        )
    else:
        pace = "unpaced (as fast as the provider writes them)"
    rounds = [Round(**r) for r in report["rounds"]]
    out = [
        f"scale  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m['litellm']}, cortex {m['cortex_commit']}",
        f"{n} conversations "
        + (f"started over {report['stagger_s']:g} s" if report["stagger_s"] else "started at once")
        + " through nginx (1 worker, round-robin) to N `cortex serve`",
        "processes sharing PostgreSQL + Redis (fresh database per round); replies of "
        f"{report['tokens']} one-word",
        f"chunks ({report['chars']} chars), {pace}"
        + (f"; server settings: {' '.join(report['settings'])}" if report["settings"] else ""),
        "",
        f"{'procs':>5} {'done':>5} {'chunks/s':>9} {'frames/s':>9} {'gap p50':>8} {'gap p99':>8} "
        f"{'1st p50':>8} {'1st p99':>8} {'wall s':>7} {'RSS MiB max/sum':>15} {'ms CPU/chunk':>12}",
    ]
    for r in rounds:
        rss = f"{max(r.rss_peak_kib, default=0) / 1024:.0f}/{sum(r.rss_peak_kib) / 1024:.0f}"
        out.append(
            f"{r.procs:>5} {r.completed:>5} {r.chunks_per_s:>9.0f} {r.frames_per_s:>9.0f} "
            f"{r.gap_p50_ms:>8.1f} {r.gap_p99_ms:>8.1f} {r.first_p50_ms:>8.1f} "
            f"{r.first_p99_ms:>8.1f} {r.wall_s:>7.2f} {rss:>15} {r.cortex_cpu_ms_per_chunk:>12.2f}"
        )
    out += ["", "CPU over each timed phase (cores busy, 1.0 = one core), and where the work went:"]
    for r in rounds:
        out.append(
            f"{r.procs:>5} procs: " + ", ".join(f"{name} {v:.2f}" for name, v in r.cpu.items())
        )
        out.append(f"{'':>13}other processes {r.other_cpu:.0%} of the machine, steal {r.steal:.0%}")
        out.append(
            f"{'':>13}connections per process {'/'.join(map(str, r.connections))}, "
            f"replies run per process {'/'.join(map(str, r.replies))}"
        )
    if rounds:
        base = next((r for r in rounds if r.procs == 1), rounds[0])
        out += ["", f"ratios to the {base.procs}-process round (same run):"]
        for r in rounds:
            out.append(
                f"{r.procs:>5} procs: chunks/s x{r.chunks_per_s / base.chunks_per_s:.2f}, "
                f"gap p99 x{r.gap_p99_ms / base.gap_p99_ms:.2f}, "
                f"1st p99 x{r.first_p99_ms / base.first_p99_ms:.2f}"
            )
    out.append("")
    bad = [r for r in rounds if not r.correct]
    total = sum(r.conversations for r in rounds)
    done = sum(r.completed for r in rounds)
    cross = sum(r.cross_checked for r in rounds)
    cross_ok = cross - sum(r.cross_failed for r in rounds)
    history = sum(r.history_checked for r in rounds)
    if not bad:
        out.append(
            f"correct: all {done}/{total} replies complete, deltas contiguous and equal to the "
            "expected text;"
        )
        out.append(
            f"cross-process check: {cross_ok}/{cross} conversations right (sender and watcher on "
            "different processes when N > 1);"
        )
        out.append(f"history of all {history} conversations as expected")
    else:
        out.append(f"NOT CORRECT: {done}/{total} replies right")
        for r in bad:
            for line in (r.problems + r.cross_problems + r.history_problems)[:10]:
                out.append(f"  {r.procs} procs: {line}")
    for r in rounds:
        codes = ", ".join(str(c) for c in r.server_exit_codes)
        if r.log_errors or any(c != 0 for c in r.server_exit_codes):
            out.append(
                f"{r.procs} procs: server exit codes {codes}; error lines in logs: {r.log_errors}"
            )
            out += [f"  {line}" for line in r.log_error_lines]
    if all(not r.log_errors and all(c == 0 for c in r.server_exit_codes) for r in rounds):
        out.append("every server exited 0 with no error line in its log (nor in nginx's)")
    cpus = int(m["cpus"] or 0)
    out += [
        "",
        "chunks/s: reply chunks (words) delivered in delta text over all streams / round wall",
        "time (first send to last final message); frames/s: delta frames / wall (a server",
        "merges the deltas of a connection that lags); gap: between consecutive delta frames of",
        "one stream; 1st: send to first delta; RSS: peak (VmHWM) of the Cortex processes, the",
        "largest and their sum; ms CPU/chunk: CPU of all Cortex processes / chunks delivered.",
    ]
    offered = n / delay if delay else float("inf")
    if rounds and all(r.chunks_per_s < 0.8 * offered for r in rounds):
        out += [
            "The provider offered more chunks than were delivered in every round: chunks/s is what",
            "the processes could relay, and gap and 1st include queueing behind other streams.",
        ]
    most = max((r.procs for r in rounds), default=0)
    out += [
        f"Note: this machine has {cpus} cores, shared by the Cortex processes, nginx, PostgreSQL,",
        "Redis, the provider, the client and any other load: the ratios are CPU-bound here.",
        *(
            [f"{most} processes on {cpus} cores cannot be expected to beat {cpus} processes."]
            if most > cpus
            else []
        ),
        "The rounds show that scale-out works and what it costs, not how it scales on a",
        "machine with a core per process.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--procs", default="1,2,4", help="Cortex process counts, one round each (default 1,2,4)"
    )
    parser.add_argument("--conversations", type=int, default=40, help="concurrent conversations")
    parser.add_argument("--tokens", type=int, default=200, help="chunks (words) per reply")
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.005,
        metavar="S",
        help="seconds between the provider's chunks (0: unpaced)",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, metavar="S", help="spread the sends over S seconds"
    )
    parser.add_argument(
        "--check", type=int, default=8, metavar="K", help="conversations in the cross-process check"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CORTEX_NAME=VALUE",
        help="a setting for every Cortex process (repeatable)",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="work in DIR and keep it (server, nginx and client logs) instead of a temporary one",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    try:
        args.procs = [int(p) for p in args.procs.split(",") if p.strip()]
    except ValueError:
        parser.error("--procs wants numbers such as 1,2,4")
    if not args.procs or min(args.procs) < 1 or args.conversations < 1 or args.tokens < 2:
        parser.error("--procs and --conversations must be positive, --tokens at least 2")
    if args.chunk_delay < 0 or args.stagger < 0 or args.check < 0:
        parser.error("--chunk-delay, --stagger and --check must not be negative")
    try:
        server_settings(args.set)
    except SystemExit as exc:
        parser.error(str(exc))
    if args.keep:
        keep = Path(args.keep).resolve()
        keep.mkdir(parents=True, exist_ok=True)
        args.keep = str(keep)
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    ok = all(
        Round(**r).correct and not r["log_errors"] and all(c == 0 for c in r["server_exit_codes"])
        for r in report["rounds"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["client"]:
        asyncio.run(serve_commands(ScaleClient()))
    else:
        sys.exit(main())
