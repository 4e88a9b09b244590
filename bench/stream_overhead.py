"""What Cortex adds to a streamed reply, against LiteLLM called directly, in one run.

    .venv/bin/python bench/stream_overhead.py [--chunks 500] [--repeat 5] [--concurrency 1 ...]
                                              [--all] [--json]

Three processes, all on 127.0.0.1: the fake OpenAI-compatible provider (one word per chunk,
no delay), a `cortex serve` process, and this script.

(a) direct: this script calls `litellm.acompletion(..., stream=True)` against the fake provider
    and iterates every chunk: time to the first content chunk, and chunks/s from the call to the
    end of the stream.
(b) cortex: this script, as WebSocket client(s), sends a message to the Cortex process, which
    calls the model (its direct SSE reader, or LiteLLM with `--set CORTEX_LLM_FAST_PATH=0`)
    and relays each chunk as a `delta`: time from `send` to the first `delta`, and chunks/s
    from `send` to the final stored `message`.
(c) floor: this script reads the same stream with bare httpx `aiter_lines()` + `json.loads`,
    the least any reader can spend per chunk; Cortex's CPU per chunk is printed against it.

Cortex runs in its own process, not in-process with `running()`: in-process, the client's
frame parsing and the server's work would share one event loop and one core, so the figure
would charge the client's CPU to Cortex (and a 2-core machine would leave one core idle). The
fake provider is a process of its own in both modes, so it costs both modes the same.
Both modes alternate within each repeat so that drift (thermal, other load) hits both alike,
and every timed batch starts after the same SETTLE_S of quiet: a first chunk after half a
second idle comes 3-4 ms later than one right after another stream (cold caches, an idle vCPU),
so a batch that follows straight on from the one before would be timed warm, the other cold.
Ratios are cortex/direct: throughput >= 1 would mean Cortex is as fast as LiteLLM alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import (
    PROMPT,
    REPO,
    Batch,
    ForeignLoad,
    Stream,
    Summary,
    children,
    litellm_chunks,
    machine,
    print_report,
    proc_cpu_seconds,
    proc_status,
    server_settings,
    start_cortex,
    start_fake_provider,
    summarize,
)
from websockets.asyncio.client import ClientConnection, connect

from cortex.testing.processes import Child, log_problems

SETTLE_S = 0.5  # quiet before every timed batch, both modes alike
TIMEOUT = 120.0  # per batch, plus a second per 200 chunks in it (C=200 x 1,000 chunks: 1,120 s)


# ---------------------------------------------------------------------- (a) LiteLLM directly


Hook = Callable[[Any], None]


def window_hook() -> Hook | None:
    """Cortex's bound on LiteLLM's per-stream chunk list, if this Cortex has one.

    LiteLLM keeps every chunk of a stream and works over the whole list at its end; Cortex
    replaces that (still empty) list with a short window, `cortex.llm.ChunkWindow`. Applied to
    a direct call, it gives a second baseline: what is left of the difference is Cortex's own
    work.
    """
    import cortex.llm

    window: Callable[[], list[Any]] | None = getattr(cortex.llm, "ChunkWindow", None)
    if window is None:
        return None

    def bound(response: Any) -> None:
        chunks = getattr(response, "chunks", None)
        if isinstance(chunks, list) and not chunks:
            response.chunks = window()

    return bound


async def direct_stream(litellm: ModuleType, api_base: str, hook: Hook | None) -> Stream:
    times: list[float] = []
    start = time.perf_counter()
    await litellm_chunks(litellm, api_base, times, time.perf_counter, hook)
    end = time.perf_counter()
    first = times[0] if times else start
    return Stream(first=first - start, total=end - start, chunks=len(times))


def batch_timeout(streams: int, chunks: int) -> float:
    """Long enough for a batch on a slow, loaded machine: fixed, plus time for every chunk."""
    return TIMEOUT + streams * chunks / 200


async def direct_batch(
    litellm: ModuleType, api_base: str, concurrency: int, chunks: int, hook: Hook | None = None
) -> Batch:
    cpu0 = time.process_time()
    start = time.perf_counter()
    async with asyncio.timeout(batch_timeout(concurrency, chunks)):
        streams = await asyncio.gather(
            *(direct_stream(litellm, api_base, hook) for _ in range(concurrency))
        )
    wall = time.perf_counter() - start
    return Batch(wall=wall, cpu=time.process_time() - cpu0, streams=list(streams))


# ------------------------------------------------------------------- (c) the bare httpx floor


async def floor_stream(client: Any, api_base: str) -> Stream:
    """The stream read with httpx lines and `json.loads`, nothing else: the floor."""
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    count = 0
    url = api_base.rstrip("/") + "/chat/completions"
    async with client.stream("POST", url, json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            choices = event.get("choices")
            if choices and choices[0]["delta"].get("content"):
                count += 1
                if not first:
                    first = time.perf_counter()
    end = time.perf_counter()
    return Stream(first=first - start, total=end - start, chunks=count)


async def floor_batch(client: Any, api_base: str, concurrency: int, chunks: int) -> Batch:
    cpu0 = time.process_time()
    start = time.perf_counter()
    async with asyncio.timeout(batch_timeout(concurrency, chunks)):
        streams = await asyncio.gather(
            *(floor_stream(client, api_base) for _ in range(concurrency))
        )
    wall = time.perf_counter() - start
    return Batch(wall=wall, cpu=time.process_time() - cpu0, streams=list(streams))


# ------------------------------------------------------------------------ (b) through Cortex

_rids = itertools.count(1)


async def cortex_stream(ws: ClientConnection) -> Stream:
    """Send a message in a new conversation; read up to the reply's final `message`."""
    rid = f"b{next(_rids)}"
    frame = json.dumps({"type": "send", "content": PROMPT, "client_msg_id": rid})
    start = time.perf_counter()
    await ws.send(frame)
    first = 0.0
    deltas = 0
    while True:
        event = json.loads(await ws.recv())
        kind = event["type"]
        if kind == "delta":
            if not first:
                first = time.perf_counter()
            deltas += 1
        elif kind == "message":
            message = event["message"]
            if message["role"] == "assistant" and message["status"] != "streaming":
                end = time.perf_counter()
                if message["status"] != "complete":
                    raise RuntimeError(f"reply ended {message['status']}: {message}")
                break
        elif kind == "error":
            raise RuntimeError(f"error event: {event}")
    return Stream(first=first - start, total=end - start, chunks=deltas)


async def cortex_batch(clients: list[ClientConnection], server: Child, chunks: int) -> Batch:
    cpu0 = proc_cpu_seconds(server.pid)
    start = time.perf_counter()
    async with asyncio.timeout(batch_timeout(len(clients), chunks)):
        streams = await asyncio.gather(*(cortex_stream(ws) for ws in clients))
    wall = time.perf_counter() - start
    # Let the reply's last bookkeeping (typing off) finish before reading the CPU clock.
    await asyncio.sleep(0.05)
    return Batch(wall=wall, cpu=proc_cpu_seconds(server.pid) - cpu0, streams=list(streams))


async def cortex_batch_fresh(concurrency: int, server: Child, chunks: int) -> Batch:
    """A batch on connections opened for it: clients left open through a long direct batch
    (C=200) would miss the server's keepalive pings while this process's loop is saturated."""
    clients = [
        await connect(server.url, compression=None, max_size=None, open_timeout=30)
        for _ in range(concurrency)
    ]
    try:
        await asyncio.sleep(SETTLE_S)  # the server's side of the connections settles, untimed
        return await cortex_batch(clients, server, chunks)
    finally:
        await asyncio.gather(*(drain(ws) for ws in clients))
        for ws in clients:
            await ws.close()


async def drain(ws: ClientConnection) -> None:
    """Read what is left of the previous reply (typing off) so the next timing starts clean."""
    with contextlib.suppress(TimeoutError):
        while True:
            await asyncio.wait_for(ws.recv(), 0.02)


# ------------------------------------------------------------------------------- the run


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from cortex.llm import load_litellm  # the same LiteLLM settings as the Cortex process

    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        workdir = Path(tmp)
        async with children() as started:
            fake = await start_fake_provider(
                [
                    "-m",
                    "cortex.testing.fake_openai",
                    "--port",
                    "0",
                    "--words",
                    str(args.chunks),
                    "--chunk-delay",
                    str(args.chunk_delay),
                    "--first-chunk-delay",
                    str(args.first_chunk_delay),
                ],
                workdir,
            )
            started.append(fake)
            # LiteLLM's import (seconds) in this process overlaps the server's start-up.
            server_task = asyncio.create_task(
                start_cortex(workdir, fake.url, server_settings(args.set))
            )
            import httpx

            floor_client = httpx.AsyncClient(
                timeout=None, limits=httpx.Limits(max_connections=None)
            )
            litellm = await asyncio.to_thread(load_litellm)
            hook = None if args.no_window_baseline else window_hook()
            server = await server_task
            started.append(server)
            idle_rss = proc_status(server.pid).get("VmRSS", 0)
            pids = (fake.pid, server.pid)
            ours0 = time.process_time() + sum(proc_cpu_seconds(p) for p in pids)
            foreign = ForeignLoad()
            results: list[Summary] = []
            peaks: dict[int, int] = {}
            for concurrency in args.concurrency:
                chunks = args.chunks
                # Warm-up (not counted): first-call costs of LiteLLM and of the server.
                await direct_batch(litellm, fake.url, concurrency, chunks)
                await floor_batch(floor_client, fake.url, concurrency, chunks)
                await cortex_batch_fresh(concurrency, server, chunks)
                floor: list[Batch] = []
                direct: list[Batch] = []
                windowed: list[Batch] = []
                cortex: list[Batch] = []
                for _ in range(args.repeat):
                    await asyncio.sleep(SETTLE_S)
                    floor.append(await floor_batch(floor_client, fake.url, concurrency, chunks))
                    await asyncio.sleep(SETTLE_S)
                    direct.append(await direct_batch(litellm, fake.url, concurrency, chunks))
                    if hook is not None:
                        await asyncio.sleep(SETTLE_S)
                        windowed.append(
                            await direct_batch(litellm, fake.url, concurrency, chunks, hook)
                        )
                    cortex.append(await cortex_batch_fresh(concurrency, server, chunks))
                results.append(summarize("floor", concurrency, args.chunks, floor))
                results.append(summarize("litellm", concurrency, args.chunks, direct))
                if windowed:
                    results.append(summarize("litellm+w", concurrency, args.chunks, windowed))
                results.append(summarize("cortex", concurrency, args.chunks, cortex))
                peaks[concurrency] = proc_status(server.pid).get("VmHWM", 0)
            await floor_client.aclose()
            ours = time.process_time() + sum(proc_cpu_seconds(p) for p in pids) - ours0
            other_cpu = foreign.fraction(ours)
            status = proc_status(server.pid)
            code = await server.stop()
            problems, lines = log_problems(server.log_path)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "chunks": args.chunks,
        "chunk_delay_s": args.chunk_delay,
        "first_chunk_delay_s": args.first_chunk_delay,
        "server_settings": server_settings(args.set),
        "repeat": args.repeat,
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "results": [asdict(r) for r in results],
        "server": {
            "idle_rss_kib": idle_rss,
            "peak_rss_kib": status.get("VmHWM", 0),
            "peak_rss_kib_after_concurrency": peaks,
            "exit_code": code,
            "log_errors": problems,
            "log_error_lines": lines,
        },
        "bench_process_peak_rss_kib": proc_status(os.getpid()).get("VmHWM", 0),
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"stream_overhead  {report['date']}  {m['cpus']} x {m['cpu_model']}, "
        f"python {m['python']}, litellm {m['litellm']}, cortex {m['cortex_commit']}",
        f"{report['chunks']} chunks per stream (one word each, "
        f"{report['chunk_delay_s'] * 1000:g} ms apart, the first after "
        f"{report.get('first_chunk_delay_s', 0) * 1000:g} ms), "
        f"median of {report['repeat']} repeats; "
        f"other processes used {report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile",
        f"server settings: {report['server_settings'] or 'defaults (the direct path)'}",
        "",
        f"{'conc':>4}  {'path':<8} {'first chunk ms':>14} {'total ms':>9} {'chunks/s':>9} "
        f"{'CPU us/chunk':>12} {'frames':>7}",
    ]
    by_conc: dict[int, dict[str, dict[str, Any]]] = {}
    for r in report["results"]:
        by_conc.setdefault(r["concurrency"], {})[r["path"]] = r
    for conc, modes in by_conc.items():
        for mode in ("floor", "litellm", "litellm+w", "cortex"):
            if mode not in modes:
                continue
            r = modes[mode]
            out.append(
                f"{conc:>4}  {mode:<8} {r['first_ms']:>14.2f} {r['total_ms']:>9.1f} "
                f"{r['chunks_per_s']:>9.0f} {r['cpu_us_per_chunk']:>12.0f} "
                f"{r['frames_per_stream']:>7.0f}"
            )
        b = modes["cortex"]
        if "floor" in modes:
            late = b["first_ms"] - modes["floor"]["first_ms"]
            out.append(
                f"{'':>4}  cortex/floor first chunk {late:+.2f} ms "
                f"({'meets' if late <= 2 else 'misses'} the target +2 ms)"
            )
            ratio = b["cpu_us_per_chunk"] / modes["floor"]["cpu_us_per_chunk"]
            verdict = "meets" if ratio <= 5 else "misses"
            out.append(
                f"{'':>4}  cortex/floor CPU per chunk x{ratio:.2f} ({verdict} the target x5)"
            )
        for base in ("litellm", "litellm+w"):
            if base not in modes:
                continue
            a = modes[base]
            out.append(
                f"{'':>4}  cortex/{base:<9} throughput {b['chunks_per_s'] / a['chunks_per_s']:.3f}"
                f", first chunk {b['first_ms'] - a['first_ms']:+.2f} ms"
                f", CPU per chunk x{b['cpu_us_per_chunk'] / a['cpu_us_per_chunk']:.2f}"
            )
    s = report["server"]
    peaks = ", ".join(
        f"C={c}: {k / 1024:.0f}" for c, k in s["peak_rss_kib_after_concurrency"].items()
    )
    out += [
        "",
        f"cortex server RSS: idle {s['idle_rss_kib'] / 1024:.0f} MiB, "
        f"peak (VmHWM) {s['peak_rss_kib'] / 1024:.0f} MiB (after {peaks} MiB); "
        f"this process (direct LiteLLM + clients) peak "
        f"{report['bench_process_peak_rss_kib'] / 1024:.0f} MiB",
        f"cortex server exit code {s['exit_code']}, error lines in its log: {s['log_errors']}",
    ]
    out += [f"  {line}" for line in s["log_error_lines"]]
    out += [
        "",
        "floor: bare httpx aiter_lines + json.loads here, the least a reader spends;",
        "litellm: litellm.acompletion called here; litellm+w: the same with Cortex's bound on",
        "LiteLLM's chunk list (what remains against it is Cortex's own work); cortex: through",
        "the server to WebSocket clients. first chunk: request/send to the first content",
        "chunk/delta; total: to the end of the stream (direct) or the final stored message",
        "(cortex); frames: chunks (direct) or delta frames (cortex) per stream; CPU: of the",
        "process running LiteLLM (this one, or the server; 10 ms clock resolution).",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=500, help="chunks per reply (one word each)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1],
        metavar="C",
        help="concurrent conversations (several values run one after another)",
    )
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds between the provider's chunks (default 0: as fast as it can)",
    )
    parser.add_argument(
        "--first-chunk-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds the provider takes to its first chunk (0.2: issue 24's first-delta case)",
    )
    parser.add_argument(
        "--no-window-baseline",
        action="store_true",
        help="skip the litellm+w baseline (LiteLLM with Cortex's chunk-list bound)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CORTEX_X=V",
        help="a server setting (CORTEX_LLM_FAST_PATH=0: the LiteLLM path)",
    )
    parser.add_argument("--all", action="store_true", help="concurrency 1 and 20")
    parser.add_argument(
        "--json", action="store_true", help="JSON on stdout (the table goes to stderr)"
    )
    args = parser.parse_args(argv)
    if args.all:
        args.concurrency = sorted({*args.concurrency, 1, 20})
    if args.chunks < 1 or args.repeat < 1 or min(args.concurrency) < 1:
        parser.error("--chunks, --repeat and --concurrency must be positive")
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0 if report["server"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
