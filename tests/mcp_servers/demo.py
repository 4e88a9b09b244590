"""A test MCP server written with the SDK: `python demo.py` (stdio) or `python demo.py http PORT`.

Tools with arguments, a slow one (it records being cancelled in $MCP_MARKS), one that raises,
an image, 1 MB of text, one that kills the process mid-call, one that adds a tool (list_changed).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image

mcp = MCPServer("demo")


def _mark(text: str) -> None:
    marks = os.environ.get("MCP_MARKS")
    if marks:
        with Path(marks).open("a") as f:
            f.write(text + "\n")


@mcp.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@mcp.tool()
def echo(text: str) -> str:
    """Return the text as it is."""
    return text


@mcp.tool()
def env(name: str) -> str:
    """One variable of this server's environment ('<unset>' when absent)."""
    return os.environ.get(name, "<unset>")


@mcp.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer; a cancelled call is recorded."""
    _mark(f"slow started {seconds}")
    try:
        await asyncio.sleep(seconds)
    except BaseException:
        _mark("slow cancelled")
        raise
    return "slept"


@mcp.tool()
def boom(reason: str) -> str:
    """Always raises."""
    raise ToolError(f"boom: {reason}")


@mcp.tool()
def picture() -> Image:
    """A small PNG."""
    return Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 2040, format="png")


@mcp.tool()
def big() -> str:
    """One megabyte of text."""
    return "x" * 1_000_000


@mcp.tool()
def crash() -> str:
    """The process dies in the middle of the call."""
    os._exit(3)


@mcp.tool()
async def grow(ctx: Context) -> str:
    """Add a tool named `extra` and say that the list changed."""
    mcp.add_tool(lambda: "extra!", name="extra", description="Added at run time.")
    await ctx.notify_tools_changed()
    return "grown"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "http":
        mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        mcp.run()
