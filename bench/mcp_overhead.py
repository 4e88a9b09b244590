"""What an MCP tool call costs through Cortex, against the same call with the SDK directly.

Through Cortex: `ToolRegistry.run("demo__echo", ...)`, the path a reply's tool call takes
(registry lookup, argument parsing, the per-call timeout, the result made into the model's
text, per-server metrics) over the connection `McpServers` keeps. Directly:
`Client.call_tool("echo", ...)` on an `mcp.Client` of its own. Both talk to the same test server
(tests/mcp_servers/demo.py), over stdio and over streamable HTTP, with the two modes
interleaved call by call so that the shared machine's drift hits them alike.

Start-up: from `McpServers.start()` until every server's tools are in the registry, with 1 and
with N stdio servers (they connect in parallel), and how long `running(settings)` takes to
listen with N servers configured (it must not wait for them).

    python bench/mcp_overhead.py                 # 200 calls per mode, 10 servers (~30 s)
    python bench/mcp_overhead.py --calls 50 --servers 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from cortex.app import running
from cortex.config import Settings
from cortex.testing.services import free_port
from cortex.tools.mcp import McpServers
from cortex.tools.mcp.config import ServerConfig
from cortex.tools.registry import ToolRegistry

DEMO = Path(__file__).resolve().parent.parent / "tests" / "mcp_servers" / "demo.py"
ARGS = {"text": "hello"}


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000}


async def _calls(config: ServerConfig, target: Any, n: int) -> dict[str, dict[str, float]]:
    registry = ToolRegistry()
    servers = McpServers([config], registry=registry, connect_timeout=30)
    servers.start()
    through: list[float] = []
    direct: list[float] = []
    try:
        await servers.wait_tried(30)
        assert servers.servers[config.name].state == "up", servers.status()
        name = f"{config.name}__echo"
        raw = json.dumps(ARGS)
        async with Client(target) as client:
            for _ in range(10):  # warm both paths
                await registry.run(name, raw, timeout=30)
                await client.call_tool("echo", ARGS)
            for _ in range(n):
                t0 = time.perf_counter()
                outcome = await registry.run(name, raw, timeout=30)
                t1 = time.perf_counter()
                await client.call_tool("echo", ARGS)
                t2 = time.perf_counter()
                assert outcome.ok, outcome
                through.append(t1 - t0)
                direct.append(t2 - t1)
    finally:
        await servers.stop()
    return {"cortex": _ms(through), "sdk": _ms(direct)}


async def _http_server() -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEMO),
        "http",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    for _ in range(600):
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return child, url
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the HTTP server did not start")


def _stdio_config(name: str) -> ServerConfig:
    return ServerConfig(name=name, command=sys.executable, args=(str(DEMO),))


async def _startup(n: int) -> float:
    registry = ToolRegistry()
    configs = [_stdio_config(f"s{i}") for i in range(n)]
    servers = McpServers(configs, registry=registry, connect_timeout=60)
    t0 = time.perf_counter()
    servers.start()
    try:
        await servers.wait_tried(120)
        elapsed = time.perf_counter() - t0
        assert all(s["state"] == "up" for s in servers.status()), servers.status()
        return elapsed
    finally:
        await servers.stop()


async def _listen_time(n: int, workdir: Path) -> float:
    path = workdir / "mcp.json"
    servers = {f"s{i}": {"command": sys.executable, "args": [str(DEMO)]} for i in range(n)}
    path.write_text(json.dumps({"mcpServers": servers}))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        port=0,
        database_url=f"sqlite+aiosqlite:///{workdir / 'c.db'}",  # migrated by the warm-up
        mcp_config=path if n else None,
        use_mock=True,
    )
    t0 = time.perf_counter()
    async with running(settings):
        return time.perf_counter() - t0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per mode (default 200)")
    parser.add_argument("--servers", type=int, default=10, help="servers at start-up (10)")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    stdio = _stdio_config("demo")
    report["stdio"] = await _calls(
        stdio, StdioServerParameters(command=sys.executable, args=[str(DEMO)]), args.calls
    )
    child, url = await _http_server()
    try:
        report["http"] = await _calls(ServerConfig(name="web", url=url), url, args.calls)
    finally:
        child.kill()
        await child.wait()
    report["startup_s"] = {"1": await _startup(1), str(args.servers): await _startup(args.servers)}
    with tempfile.TemporaryDirectory() as tmp:
        await _listen_time(0, Path(tmp))  # warm: the first start imports LiteLLM and migrates
        report["listen_s"] = {
            "0": await _listen_time(0, Path(tmp)),
            str(args.servers): await _listen_time(args.servers, Path(tmp)),
        }
    print(f"{'transport':<10}{'mode':<8}{'median ms':>10}{'p99 ms':>10}")
    for transport in ("stdio", "http"):
        for mode in ("sdk", "cortex"):
            row = report[transport][mode]
            print(f"{transport:<10}{mode:<8}{row['median_ms']:>10.2f}{row['p99_ms']:>10.2f}")
    for n, s in report["startup_s"].items():
        print(f"all tools registered, {n} stdio server(s): {s:.2f} s")
    for n, s in report["listen_s"].items():
        print(f"cortex listening with {n} servers configured: {s:.2f} s")
    print(json.dumps(report), file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
