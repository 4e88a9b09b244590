"""A whole conversation as a file: JSON (everything, for machines) or Markdown (for people).

Served at `GET /api/conversations/{id}/export?format=json|md` as an attachment.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ..protocol import AttachmentView, MessageView
from .views import ConversationRow, MessageRow, conversation_view, iso, message_view

FORMATS = ("json", "md")
EXPORT_VERSION = "cortex.conversation.v1"
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def export_json(
    conv: ConversationRow,
    rows: Sequence[MessageRow],
    attachments: Mapping[str, list[AttachmentView]] | None = None,
    data: Mapping[str, bytes] | None = None,
) -> bytes:
    """Everything; with `data`, each attachment carries its bytes as `data_base64`."""
    files = attachments or {}
    messages = []
    for row in rows:
        view = message_view(row, attachments=files.get(row.id))
        message = view.model_dump(mode="json", exclude_none=True)
        if data is not None:
            for attachment in message.get("attachments", []):
                attachment["data_base64"] = base64.b64encode(data[attachment["id"]]).decode()
        messages.append(message)
    payload: dict[str, Any] = {
        "format": EXPORT_VERSION,
        "exported_at": iso(datetime.now(UTC)),
        "conversation": conversation_view(conv).model_dump(mode="json", exclude_none=True),
        "messages": messages,
    }
    return json.dumps(payload, ensure_ascii=False, indent=2).encode()


def export_markdown(
    conv: ConversationRow,
    rows: Sequence[MessageRow],
    attachments: Mapping[str, list[AttachmentView]] | None = None,
) -> bytes:
    view = conversation_view(conv)
    lines = [f"# {view.title or 'Untitled conversation'}", ""]
    lines.append(f"- Conversation: `{view.id}`")
    lines.append(f"- Created: {view.created_at}")
    if view.model:
        lines.append(f"- Model: {view.model}")
    if view.temperature is not None:
        lines.append(f"- Temperature: {view.temperature:g}")
    if view.system_prompt:
        lines.append("- System prompt:")
        lines.extend(f"  > {line}" if line else "  >" for line in view.system_prompt.splitlines())
    lines.append("")
    on_path = active_path(conv, rows)
    files = attachments or {}
    for row in rows:
        if row.id in on_path:
            lines.extend(_message_markdown(message_view(row, attachments=files.get(row.id))))
    others = [row for row in rows if row.id not in on_path]
    if others:
        # The branches not on the active path (older edits and replies), each message naming
        # the one it follows.
        lines.extend(["---", "", "# Other branches", ""])
        for row in others:
            message = message_view(row, attachments=files.get(row.id))
            lines.extend(_message_markdown(message, follows=row.parent_id))
    return ("\n".join(lines).rstrip() + "\n").encode()


def active_path(conv: ConversationRow, rows: Sequence[MessageRow]) -> set[str]:
    """The ids from the active leaf up to the root, among `rows` (the whole conversation)."""
    parents = {row.id: row.parent_id for row in rows}
    path: set[str] = set()
    node = conv.active_leaf_id
    while node is not None and node in parents and node not in path:
        path.add(node)
        node = parents[node]
    return path


def _message_markdown(message: MessageView, follows: str | None = None) -> list[str]:
    heading = f"## {_ROLE_NAMES.get(message.role, message.role.title())}"
    notes = [f"`{message.id}`, after `{follows}`"] if follows is not None else []
    if message.model and message.role == "assistant":
        notes.append(message.model)
    if message.status != "complete":
        notes.append(message.status)
    if message.error_code:
        notes.append(f"error: {message.error_code}")
    if notes:
        heading += f" ({', '.join(notes)})"
    out = [heading, "", f"*{message.created_at}*", ""]
    if message.role == "tool":
        out.extend([_fence(message.content, "json"), ""])
    elif message.content:
        out.extend([message.content, ""])
    for a in message.attachments or ():
        out.append(f"- Attached: {a.filename} ({a.kind}, {a.size:,} bytes)")
    if message.attachments:
        out.append("")
    for call in message.tool_calls or ():
        function = call.get("function", {})
        name = function.get("name", "?")
        out.extend([f"Tool call `{name}`:", "", _fence(str(function.get("arguments", "")))])
        out.append("")
    return out


def _fence(text: str, language: str = "") -> str:
    """A code block whose fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def filename(conv: ConversationRow, fmt: str) -> str:
    """`cortex-<title words>-<id start>.<fmt>`: ASCII only, safe in a header."""
    slug = re.sub(r"[^a-z0-9]+", "-", conv.title.lower()).strip("-")[:40].strip("-")
    stem = f"cortex-{slug}-{conv.id[:8]}" if slug else f"cortex-{conv.id[:8]}"
    return f"{stem}.{fmt}"


def content_type(fmt: str) -> str:
    return "application/json" if fmt == "json" else "text/markdown; charset=utf-8"


def render(
    conv: ConversationRow,
    rows: Sequence[MessageRow],
    fmt: str,
    *,
    attachments: Mapping[str, list[AttachmentView]] | None = None,
    data: Mapping[str, bytes] | None = None,
) -> bytes:
    if fmt == "json":
        return export_json(conv, rows, attachments, data)
    return export_markdown(conv, rows, attachments)
