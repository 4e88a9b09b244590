"""Stored rows as the wire sees them, and as the model sees them (OpenAI message format)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from ..attachments.parts import ModelAttachment, as_is, content_parts
from ..protocol import (
    AttachmentView,
    ConversationEvent,
    ConversationView,
    MessageEvent,
    MessageView,
    SearchHit,
    Usage,
)
from ..search.index import Hit


class MessageRow(Protocol):
    id: str
    conversation_id: str
    seq: int
    role: str
    content: str
    status: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    finish_reason: str | None
    error_code: str | None
    created_at: datetime
    parent_id: str | None


class ModelMessageRow(Protocol):
    """What the model is shown of a stored message."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def tool_calls(self) -> list[dict[str, Any]] | None: ...
    @property
    def tool_call_id(self) -> str | None: ...
    @property
    def id(self) -> str | None: ...


class ConversationRow(Protocol):
    id: str
    title: str
    model: str | None
    system_prompt: str | None
    temperature: float | None
    created_at: datetime
    updated_at: datetime
    last_seq: int
    active_leaf_id: str | None


def iso(moment: datetime) -> str:
    """A stored moment in UTC with `Z`. SQLite hands datetimes back without their zone; Cortex
    stores UTC only, so a naive one is UTC too."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def message_view(
    row: MessageRow,
    *,
    content: str | None = None,
    sibling_ids: list[str] | None = None,
    attachments: list[AttachmentView] | None = None,
) -> MessageView:
    has_usage = row.prompt_tokens is not None or row.completion_tokens is not None
    return MessageView.model_construct(
        id=row.id,
        seq=row.seq,
        role=row.role,
        content=row.content if content is None else content,
        status=row.status,
        created_at=iso(row.created_at),
        parent_id=row.parent_id,
        sibling_ids=sibling_ids,
        model=row.model,
        tool_calls=row.tool_calls or None,
        tool_call_id=row.tool_call_id,
        usage=Usage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost_usd=row.cost_usd,
        )
        if has_usage
        else None,
        finish_reason=row.finish_reason,
        error_code=row.error_code,
        attachments=attachments or None,
    )


def message_event(
    row: MessageRow,
    *,
    content: str | None = None,
    sibling_ids: list[str] | None = None,
    attachments: list[AttachmentView] | None = None,
) -> str:
    return MessageEvent.model_construct(
        conversation_id=row.conversation_id,
        seq=row.seq,
        message=message_view(
            row, content=content, sibling_ids=sibling_ids, attachments=attachments
        ),
    ).encode()


def conversation_view(row: ConversationRow) -> ConversationView:
    return ConversationView.model_construct(
        id=row.id,
        title=row.title,
        model=row.model,
        system_prompt=row.system_prompt,
        temperature=row.temperature,
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
        last_seq=row.last_seq,
        active_leaf_id=row.active_leaf_id,
    )


def path_event(row: ConversationRow) -> str:
    """The active path changed: every client of the conversation re-reads `history`."""
    return ConversationEvent.model_construct(
        conversation_id=row.id,
        conversation=conversation_view(row),
        active_leaf_id=row.active_leaf_id,
    ).encode()


def search_hit(hit: Hit) -> SearchHit:
    return SearchHit.model_construct(
        kind=hit.kind,
        conversation_id=hit.conversation_id,
        conversation_title=hit.conversation_title,
        message_id=hit.message_id,
        seq=hit.seq,
        role=hit.role,
        created_at=iso(hit.created_at),
        snippet=hit.snippet,
        highlights=list(hit.highlights),
        on_active_path=hit.on_active_path,
    )


def openai_messages(
    rows: Sequence[ModelMessageRow],
    attachments: Mapping[str, list[ModelAttachment]] | None = None,
) -> list[dict[str, Any]]:
    """History in the order providers require: each assistant tool call followed by its result.

    A user message with attachments (by its id in `attachments`) gets content parts.

    A tool call whose result was never stored (a reply cancelled mid-tools) is left out, since
    providers refuse a call without a result.
    """
    answered = {row.tool_call_id for row in rows if row.role == "tool"}
    out: list[dict[str, Any]] = []
    for row in rows:
        if row.role == "tool":
            out.append({"role": "tool", "tool_call_id": row.tool_call_id, "content": row.content})
        elif row.role == "assistant" and row.tool_calls:
            calls = [c for c in row.tool_calls if c.get("id") in answered]
            message: dict[str, Any] = {"role": "assistant", "content": row.content or None}
            if calls:
                message["tool_calls"] = calls
            elif not row.content:
                continue
            out.append(message)
        elif attachments and row.role == "user" and row.id is not None and row.id in attachments:
            parts = content_parts(row.content, attachments[row.id], scale=as_is)  # scaled already
            out.append({"role": "user", "content": parts})
        elif row.content:
            out.append({"role": row.role, "content": row.content})
    return out


def listed_event(row: ConversationRow) -> str:
    """A conversation in the user's list is new or changed: for every tab's sidebar."""
    return ConversationEvent.model_construct(
        conversation_id=row.id, conversation=conversation_view(row)
    ).encode()
