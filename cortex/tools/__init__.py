"""Tools the model may call: the registry, `@tool`, and the built-in tools.

`from cortex.tools import tool` is how an operator's module marks its functions.
"""

from .registry import (
    Tool,
    ToolRegistry,
    ToolResult,
    UnknownTool,
    build_registry,
    builtin_registry,
    parse_arguments,
    tool,
)

__all__ = [
    "Tool",
    "ToolRegistry",
    "ToolResult",
    "UnknownTool",
    "build_registry",
    "builtin_registry",
    "parse_arguments",
    "tool",
]
