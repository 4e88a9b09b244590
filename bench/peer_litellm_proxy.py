"""Cortex against LiteLLM's own proxy server, relaying the same streams, side by side.

    .venv/bin/python bench/peer_litellm_proxy.py [--concurrency 1 20] [--chunks 500]
                                                 [--chunk-delay 0] [--repeat 3]
                                                 [--proxy .venv-proxy/bin/litellm] [--json]

Needs LiteLLM's proxy: `litellm[proxy]` does not install from PyPI, so scripts/bench-proxy-venv.sh
makes it a venv of its own (.venv-proxy, from bench/requirements-proxy.txt); pass its `litellm`
with --proxy.
Processes, all on 127.0.0.1: the fake OpenAI-compatible provider (cortex.testing's, one word
per chunk), LiteLLM's proxy (`litellm --config cfg.yaml`: one model entry pointing at the
fake's api_base, no database, no master key, one uvicorn worker, its defaults otherwise), a
`cortex serve` process on a fresh SQLite file (model `openai/fake` at the same api_base), and
this script with the clients:
- proxy: C concurrent `POST /v1/chat/completions` with `stream: true`, each read as SSE by
  an aiohttp client that decodes every event;
- cortex: C WebSocket clients (bench/_swarm.py's lean client, decoding every frame), each
  sending the first message of a new conversation and reading to the stored final message.
Both sides run the same LiteLLM version against the same provider; Cortex also stores every
message (checked in its database afterwards), the proxy stores nothing. Per C, alternating
the two within each repeat: the batch's total time (first request to the last stream's end),
the median time to the first token, the server's CPU per chunk, and the ratios (targets:
Cortex at least 5x faster end to end at C=20 (issue 24; 1.25x before Cortex read OpenAI-format
streams itself), and a lower first-token latency).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    PROMPT,
    REPO,
    SYSTEM_PROMPT,
    Batch,
    ForeignLoad,
    Stream,
    Summary,
    children,
    machine,
    print_report,
    proc_cpu_seconds,
    proc_status,
    server_settings,
    start_cortex,
    start_fake_provider,
    summarize,
    tree_cpu_seconds,
)
from _swarm import Profiler, RawWs, open_ws

from cortex.testing.processes import Child, clean_env, log_problems, log_tail
from cortex.testing.services import free_port

TIMEOUT = 180.0


# ------------------------------------------------------------------------- LiteLLM's proxy


async def start_proxy(workdir: Path, api_base: str, exe: Path, timeout: float = 180.0) -> Child:
    """`litellm --config` on a free loopback port, ready when /health/liveliness answers."""
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: fake\n"
        "    litellm_params:\n"
        "      model: openai/fake\n"
        f"      api_base: {api_base}\n"
        "      api_key: sk-fake\n"
    )
    port = free_port()
    log_path = workdir / "litellm-proxy.log"
    env = clean_env(
        {
            # No master key, as asked: the proxy refuses to start without this switch.
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
    )
    env.pop("DATABASE_URL", None)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(exe),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=env,
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    child = Child("litellm-proxy", proc, log_path, url=f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the LiteLLM proxy exited; its log:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                await child.stop(5)
                raise RuntimeError(f"the LiteLLM proxy was not ready in {timeout:g} s")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    f"{child.url}/health/liveliness", timeout=aiohttp.ClientTimeout(total=2)
                ) as response:
                    if response.status == 200:
                        return child
            await asyncio.sleep(0.5)


async def proxy_stream(session: aiohttp.ClientSession, url: str) -> Stream:
    body = {
        "model": "fake",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PROMPT},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    first = 0.0
    chunks = chars = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"proxy answered {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            choices = event.get("choices") or ()
            if choices:
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    if not first:
                        first = time.monotonic()
                    chunks += 1
                    chars += len(text)
    end = time.monotonic()
    return Stream(first=first - start, total=end - start, chunks=chunks, chars=chars)


async def proxy_batch(session: aiohttp.ClientSession, proxy: Child, concurrency: int) -> Batch:
    cpu0 = tree_cpu_seconds(proxy.pid)
    start = time.monotonic()
    async with asyncio.timeout(TIMEOUT):
        streams = await asyncio.gather(
            *(proxy_stream(session, proxy.url) for _ in range(concurrency))
        )
    wall = time.monotonic() - start
    await asyncio.sleep(0.05)  # the request's last bookkeeping, before reading the clock
    return Batch(wall=wall, cpu=tree_cpu_seconds(proxy.pid) - cpu0, streams=list(streams))


# -------------------------------------------------------------------------------- Cortex


async def cortex_stream(ws: RawWs) -> Stream:
    start = time.monotonic()
    final = await ws.converse(PROMPT, TIMEOUT)
    if final.get("status") != "complete":
        raise RuntimeError(f"reply ended {final.get('status')}: {ws.errors}")
    return Stream(
        first=ws.first_delta - start,
        total=ws.final_time - start,
        chunks=ws.deltas,
        chars=len(final.get("content") or ""),
    )


async def cortex_batch(clients: list[RawWs], server: Child) -> Batch:
    cpu0 = proc_cpu_seconds(server.pid)
    start = time.monotonic()
    async with asyncio.timeout(TIMEOUT):
        streams = await asyncio.gather(*(cortex_stream(ws) for ws in clients))
    wall = time.monotonic() - start
    await asyncio.sleep(0.05)  # typing off and the reply's last bookkeeping
    return Batch(wall=wall, cpu=proc_cpu_seconds(server.pid) - cpu0, streams=list(streams))


def stored(db: Path) -> dict[str, int]:
    """Messages in Cortex's database by role and status, read after the server stopped."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT role, status, count(*) FROM messages GROUP BY role, status")
        return {f"{role} {status}": count for role, status, count in rows}


# ------------------------------------------------------------------------------- the run


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cortex-peer-") as tmp:
        workdir = Path(tmp)
        async with children() as started:
            fake = await start_fake_provider(
                [
                    "-m",
                    "cortex.testing.fake_openai",
                    "--words",
                    str(args.chunks),
                    "--chunk-delay",
                    str(args.chunk_delay),
                ],
                workdir,
            )
            started.append(fake)
            proxy_task = asyncio.create_task(start_proxy(workdir, fake.url, args.proxy))
            server = await start_cortex(workdir, fake.url, server_settings(args.set))
            started.append(server)
            proxy = await proxy_task
            started.append(proxy)
            rss0 = {
                "cortex": proc_status(server.pid).get("VmRSS", 0),
                "proxy": proc_status(proxy.pid).get("VmRSS", 0),
            }
            foreign = ForeignLoad()
            pids = (fake.pid, server.pid, proxy.pid)
            ours0 = time.process_time() + sum(tree_cpu_seconds(p) for p in pids)
            results: list[Summary] = []
            profiles: list[str] = []
            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=TIMEOUT)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                for concurrency in args.concurrency:
                    clients = [await open_ws(server.url) for _ in range(concurrency)]
                    for ws in clients:
                        ws.decode_all = True  # as the SSE client decodes every event
                    try:
                        # Warm-up, not counted: first-call costs on both sides.
                        await proxy_batch(session, proxy, concurrency)
                        await cortex_batch(clients, server)
                        via_proxy: list[Batch] = []
                        via_cortex: list[Batch] = []
                        for _ in range(args.repeat):
                            via_proxy.append(await proxy_batch(session, proxy, concurrency))
                            await asyncio.sleep(0.2)
                            via_cortex.append(await cortex_batch(clients, server))
                            await asyncio.sleep(0.2)
                        if args.profile and concurrency == max(args.concurrency):
                            for name, child in (("cortex", server), ("proxy", proxy)):
                                spy = Profiler(child.pid, workdir / f"profile-{name}.txt")
                                async with spy:
                                    if name == "cortex":
                                        await cortex_batch(clients, server)
                                    else:
                                        await proxy_batch(session, proxy, concurrency)
                                lines = spy.top(args.profile_lines)
                                profiles.append("\n".join([f"{name} at C={concurrency}:", *lines]))
                    finally:
                        for ws in clients:
                            await ws.close()
                    results.append(summarize("proxy", concurrency, args.chunks, via_proxy))
                    results.append(summarize("cortex", concurrency, args.chunks, via_cortex))
            ours = time.process_time() + sum(tree_cpu_seconds(p) for p in pids)
            other_cpu = foreign.fraction(ours - ours0)
            rss = {
                "cortex": proc_status(server.pid).get("VmHWM", 0),
                "proxy": proc_status(proxy.pid).get("VmHWM", 0),
            }
            proxy_code = await proxy.stop()
            code = await server.stop()
            problems, lines = log_problems(server.log_path)
            messages = stored(workdir / "cortex.db")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "chunks": args.chunks,
        "chunk_delay_s": args.chunk_delay,
        "repeat": args.repeat,
        "settings": args.set,
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "results": [asdict(r) for r in results],
        "profiles": profiles,
        "idle_rss_kib": rss0,
        "peak_rss_kib": rss,
        "cortex": {
            "exit_code": code,
            "log_errors": problems,
            "log_error_lines": lines,
            "stored": messages,
        },
        "proxy_exit_code": proxy_code,
    }


SPEED_TARGET = 5.0  # issue 24, at C=20


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    delay = report["chunk_delay_s"]
    out = [
        f"peer_litellm_proxy  {report['date']}  {m['cpus']} x {m['cpu_model']}, "
        f"python {m['python']}, "
        f"litellm {m.get('litellm', '?')}, websockets {m.get('websockets', '?')}, "
        f"cortex {m.get('cortex_commit', '?')}",
        f"{report['chunks']} chunks per stream (one word each, "
        f"{'no delay' if not delay else f'{delay * 1000:g} ms apart'}), median of "
        f"{report['repeat']} repeats; other processes used "
        f"{report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile"
        + (f"; server settings: {' '.join(report['settings'])}" if report["settings"] else ""),
        "",
        f"{'C':>3}  {'path':<7} {'total ms':>9} {'first token ms':>14} {'stream ms':>9} "
        f"{'CPU us/chunk':>12} {'frames':>7} {'chars':>6}",
    ]
    by_conc: dict[int, dict[str, dict[str, Any]]] = {}
    for r in report["results"]:
        by_conc.setdefault(r["concurrency"], {})[r["path"]] = r
    for conc, paths in by_conc.items():
        for path in ("proxy", "cortex"):
            r = paths[path]
            out.append(
                f"{conc:>3}  {path:<7} {r['total_ms']:>9.1f} {r['first_ms']:>14.1f} "
                f"{r['stream_ms']:>9.1f} {r['cpu_us_per_chunk']:>12.0f} "
                f"{r['frames_per_stream']:>7.0f} {r['chars']:>6}"
            )
        p, c = paths["proxy"], paths["cortex"]
        speed = p["total_ms"] / c["total_ms"]
        out.append(
            f"{'':>3}  cortex is {speed:.2f}x as fast end to end (target >= {SPEED_TARGET:g}: "
            f"{'met' if speed >= SPEED_TARGET else 'NOT met'}); first token {c['first_ms']:.1f} vs "
            f"{p['first_ms']:.1f} ms ({'lower' if c['first_ms'] < p['first_ms'] else 'NOT lower'})"
            f"; CPU per chunk x{c['cpu_us_per_chunk'] / p['cpu_us_per_chunk']:.2f}"
        )
    for text in report["profiles"]:
        out += ["", "profile (py-spy) of one extra batch, " + text]
    c = report["cortex"]
    idle, peak = report["idle_rss_kib"], report["peak_rss_kib"]
    out += [
        "",
        f"RSS: cortex idle {idle['cortex'] / 1024:.0f} MiB, peak {peak['cortex'] / 1024:.0f} MiB;"
        f" proxy idle {idle['proxy'] / 1024:.0f} MiB, peak {peak['proxy'] / 1024:.0f} MiB",
        f"cortex stored: {c['stored']}; exit code {c['exit_code']}, error lines in its log: "
        f"{c['log_errors']}; proxy exit code {report['proxy_exit_code']}",
    ]
    out += [f"  {line}" for line in c["log_error_lines"]]
    out += [
        "",
        "total: first request to the end of the last stream of the batch (the proxy's [DONE],",
        "Cortex's stored final message); first token: request to the first content chunk /",
        "delta; CPU: the relaying server's process (tree), per chunk relayed.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=500, help="chunks per reply (one word each)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="S")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 20], metavar="C", help="streams at once"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy both at the largest C")
    parser.add_argument("--profile-lines", type=int, default=12)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="CORTEX_NAME=VALUE",
        help="a setting for the Cortex server (repeatable), e.g. CORTEX_CHECKPOINT_MS=60000",
    )
    parser.add_argument(
        "--proxy",
        type=Path,
        default=Path(sys.executable).parent / "litellm",
        help="LiteLLM's `litellm` CLI (default: beside this interpreter; "
        "scripts/bench-proxy-venv.sh makes .venv-proxy/bin/litellm)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, table on stderr")
    args = parser.parse_args(argv)
    if args.chunks < 1 or args.repeat < 1 or min(args.concurrency) < 1:
        parser.error("--chunks, --repeat and --concurrency must be positive")
    if not args.proxy.exists():
        parser.error(
            f"no `litellm` CLI at {args.proxy}: make one with scripts/bench-proxy-venv.sh, "
            "then pass --proxy .venv-proxy/bin/litellm"
        )
    report = asyncio.run(measure(args))
    print_report(report, render(report), args.json)
    return 0 if report["cortex"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
