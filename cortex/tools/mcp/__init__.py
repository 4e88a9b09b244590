"""MCP tools: servers from an `mcpServers` file, their tools in the registry (docs/tools.md).

`config` reads the operator's file, `naming` makes provider-safe tool names, `results` turns a
`CallToolResult` into what the model reads, and `servers` keeps one supervised connection per
server (connect, health, reconnect with backoff, list changes, calls with timeouts).
"""

from .config import McpConfigError, ServerConfig, load_config
from .naming import tool_name
from .servers import McpServers

__all__ = ["McpConfigError", "McpServers", "ServerConfig", "load_config", "tool_name"]
