"""`cortex mcp list` and `cortex mcp call SERVER TOOL JSON`: an operator tries a server by hand."""

from __future__ import annotations

import argparse
import asyncio
from typing import TextIO

from ...config import Settings
from .config import McpConfigError
from .probe import call_once, probe

__all__ = ["describe", "run_mcp_command"]


def describe(server: dict[str, object]) -> str:
    """One line for a server: its state, why, and its tools."""
    tools = server["tools"]
    assert isinstance(tools, list)
    if server["state"] == "up":
        return f"connected ({server['transport']}), {len(tools)} tools: {', '.join(tools)}"
    return f"{server['state']} ({server['transport']}): {server['reason']}"


def run_mcp_command(settings: Settings, args: argparse.Namespace, *, out: TextIO) -> int:
    try:
        if args.action == "list":
            found = asyncio.run(probe(settings, limit_s=args.timeout))
            if not found.servers:
                print("no MCP servers: CORTEX_MCP_CONFIG is not set or lists none", file=out)
                return 0
            for server in found.servers:
                print(f"{server['server']}: {describe(server)}", file=out)
            if found.left_out:
                print(f"left out past 128 tools: {', '.join(found.left_out)}", file=out)
            return 0 if all(s["state"] in ("up", "disabled") for s in found.servers) else 1
        result = asyncio.run(
            call_once(settings, args.server, args.tool, args.arguments, limit_s=args.timeout)
        )
    except McpConfigError as exc:
        print(f"cortex: {exc}", file=out)
        return 2
    print(result.content(), file=out)
    return 0 if result.ok else 1
