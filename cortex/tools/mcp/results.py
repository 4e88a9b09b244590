"""A `CallToolResult` becomes the text of the `tool` message the model reads.

Text stays text and structured content is JSON. An image cannot go in a `tool` message (the
chat-completions format allows image parts in user messages only), so it becomes a short note
with its type and size; the page shows that note. Everything is cut at
`CORTEX_TOOL_RESULT_MAX_CHARS`, and the cut is marked so the model knows it saw a part.
"""

from __future__ import annotations

import base64
import binascii
import json

import mcp_types as types

from ..registry import ToolResult

__all__ = ["cut", "to_result"]


def cut(text: str, limit: int) -> str:
    """At most `limit` characters of `text` plus a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[cut: {len(text) - limit} more characters not shown]"


def _size(data: str) -> str:
    try:
        n = len(base64.b64decode(data, validate=False))
    except (binascii.Error, ValueError):
        n = len(data) * 3 // 4
    return f"{n / 1024:.1f} kB" if n >= 1024 else f"{n} bytes"


def _part(block: types.ContentBlock) -> str:
    match block:
        case types.TextContent():
            return block.text
        case types.ImageContent():
            return f"[image: {block.mime_type}, {_size(block.data)}; not shown to the model]"
        case types.AudioContent():
            return f"[audio: {block.mime_type}, {_size(block.data)}; not shown to the model]"
        case types.ResourceLink():
            return f"[resource link: {block.uri}]"
        case types.EmbeddedResource():
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                return resource.text
            return f"[resource: {resource.uri}, {resource.mime_type or 'binary'}]"
    return f"[{getattr(block, 'type', 'unknown')} content]"


def to_result(result: types.CallToolResult, *, server: str, limit: int) -> ToolResult:
    """What the model gets: `ok=False` for `is_error`, so it can react to the server's error."""
    if result.structured_content is not None and not result.is_error:
        text = json.dumps(result.structured_content, ensure_ascii=False, default=str)
    else:
        text = "\n".join(_part(block) for block in result.content)
    text = cut(text, limit)
    if result.is_error:
        return ToolResult(ok=False, error=text or "the tool reported an error", server=server)
    return ToolResult(ok=True, result=text, text=text, server=server)
