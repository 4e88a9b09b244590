"""Connect the configured servers once, by hand: `cortex doctor` and `cortex mcp list|call`.

The same `McpServers` the server runs, started for the length of one command, so what the
operator sees is what `cortex serve` would get.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import Settings
from ..registry import ToolResult, build_registry
from .config import ServerConfig, load_config
from .servers import McpServers

__all__ = ["Probe", "call_once", "probe"]


@dataclass
class Probe:
    """Each server's state after one attempt, and the tools past the 128 offered."""

    servers: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def _servers(settings: Settings, configs: list[ServerConfig]) -> McpServers:
    registry = build_registry(
        modules=settings.tool_modules,
        enabled=settings.tools,
        mcp_servers=[c.name for c in configs],
    )
    return McpServers(
        configs,
        registry=registry,
        connect_timeout=settings.mcp_connect_timeout,
        backoff_s=settings.mcp_backoff_s,
        result_max_chars=settings.tool_result_max_chars,
    )


async def probe(
    settings: Settings, *, limit_s: float, environ: Mapping[str, str] | None = None
) -> Probe:
    """Connect every server in parallel, wait for one attempt each (`McpConfigError` if the
    file is bad), and stop them all."""
    if settings.mcp_config is None:
        return Probe()
    configs = load_config(settings.mcp_config, os.environ if environ is None else environ)
    servers = _servers(settings, configs)
    servers.start()
    try:
        await servers.wait_tried(limit_s)
        servers.registry.specs()  # records what the 128-tool limit leaves out
        return Probe(servers.status(), list(servers.registry.left_out))
    finally:
        await servers.stop()


async def call_once(
    settings: Settings, server: str, tool: str, arguments: str, *, limit_s: float
) -> ToolResult:
    """Connect `server` alone and call `tool` with `arguments` (a JSON object)."""
    if settings.mcp_config is None:
        return ToolResult(ok=False, error="CORTEX_MCP_CONFIG is not set")
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as exc:
        return ToolResult(ok=False, error=f"the arguments are not valid JSON: {exc.msg}")
    if not isinstance(args, dict):
        return ToolResult(ok=False, error="the arguments must be a JSON object")
    configs = [c for c in load_config(settings.mcp_config, os.environ) if c.name == server]
    if not configs:
        return ToolResult(ok=False, error=f"no server named {server!r} in {settings.mcp_config}")
    servers = _servers(settings, configs)
    servers.start()
    try:
        await servers.wait_tried(limit_s)
        one = servers.servers[server]
        if one.state != "up":
            return ToolResult(ok=False, error=f"{server} is {one.state}: {one.reason}")
        timeout = configs[0].timeout or settings.tool_timeout
        return await one.call(tool, args, timeout=timeout)
    finally:
        await servers.stop()
