"""Every frame of the wire protocol as a pydantic model (see docs/protocol.md).

Over 400 lines on purpose: the whole wire format, and its one registry, in one place to read.

A frame type is declared once, as its class: subclassing `Inbound` or `Outbound` registers it
(`INBOUND_FRAMES`, `OUTBOUND_FRAMES`), and the parser, the server's dispatch table, the metrics'
labels, the fuzz tests and the docs check all read those registries.

Inbound frames are validated strictly: `parse_frame()` returns a typed frame or raises a
`ProtocolError` whose `code` goes back to the client. Outbound events are built by the server
itself, so they skip validation (`model_construct`) and are encoded to JSON once per event, then
shared by every subscriber.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Annotated, Any, Literal, Union, cast, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from .errors import BadFrame, BadJson, ProtocolError, TooLarge, UnknownType

Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
RequestId = Annotated[str, StringConstraints(max_length=128)]
Seq = Annotated[int, Field(ge=0, le=2**53)]
Limit = Annotated[int, Field(ge=1, le=200)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
SystemPrompt = Annotated[str, StringConstraints(max_length=20_000)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Inbound(BaseModel):
    """A client frame. Each subclass is a frame type, registered by its `type` literal."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    type: str  # each frame class narrows it to its own literal
    request_id: RequestId | None = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        INBOUND_FRAMES[type_of(cls)] = cls


def type_of(cls: type[BaseModel]) -> str:
    """The `type` literal a frame class declares."""
    (kind,) = get_args(cls.model_fields["type"].annotation)
    return str(kind)


INBOUND_FRAMES: dict[str, type[Inbound]] = {}


class Send(Inbound):
    """A user message; no `conversation_id` starts a new conversation."""

    type: Literal["send"]
    conversation_id: Id | None = None
    # The message to follow (a new branch if it has children already); default: the active
    # leaf when the message's turn comes.
    parent_id: Id | None = None
    content: str
    client_msg_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    temperature: Temperature | None = None
    tools: (
        Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=64)]
        | None
    ) = None
    attachments: Annotated[list[Id], Field(max_length=100)] | None = None  # uploaded ids


class Subscribe(Inbound):
    type: Literal["subscribe"]
    conversation_id: Id
    after_seq: Seq | None = None


class Unsubscribe(Inbound):
    type: Literal["unsubscribe"]
    conversation_id: Id


class History(Inbound):
    """A page of older messages (`before_seq`), or one centred on `around_seq` (a search hit)."""

    type: Literal["history"]
    conversation_id: Id
    before_seq: Seq | None = None
    around_seq: Seq | None = None
    limit: Limit = 50
    leaf_id: Id | None = None  # another branch: the path from the root to this message


class Conversations(Inbound):
    type: Literal["conversations"]
    before: Id | None = None
    limit: Limit = 50


class Cancel(Inbound):
    type: Literal["cancel"]
    conversation_id: Id


class Ping(Inbound):
    type: Literal["ping"]


class Rename(Inbound):
    """Set a conversation's title (1 to 200 characters after trimming)."""

    type: Literal["rename"]
    conversation_id: Id
    title: Title


class Delete(Inbound):
    """Delete a conversation and every message in it; a reply in progress is cancelled."""

    type: Literal["delete"]
    conversation_id: Id


class Configure(Inbound):
    """Change a conversation's settings for its next replies.

    A field left out is unchanged; a field set to null goes back to the server's default.
    """

    type: Literal["configure"]
    conversation_id: Id
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    temperature: Temperature | None = None

    def changes(self) -> dict[str, Any]:
        """The settings this frame names, with their new values (None: the server default)."""
        named = self.model_fields_set & {"model", "system_prompt", "temperature"}
        return {name: getattr(self, name) for name in sorted(named)}


# ---- the conversation tree (docs/protocol.md, "Branches") ----


class Edit(Inbound):
    """A new version of a user message: stored beside it (same parent), the new active leaf."""

    type: Literal["edit"]
    conversation_id: Id
    message_id: Id
    content: str
    client_msg_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    # Absent: the original's attachments are kept; [] drops them.
    attachments: Annotated[list[Id], Field(max_length=100)] | None = None


class Regenerate(Inbound):
    """Another reply to the user message an assistant message answered, beside it."""

    type: Literal["regenerate"]
    conversation_id: Id
    message_id: Id
    model: ModelName | None = None
    client_msg_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None


class SwitchBranch(Inbound):
    """Make the active path run through a message, down its branch as last active."""

    type: Literal["switch_branch"]
    conversation_id: Id
    message_id: Id


class DeleteBranch(Inbound):
    """Delete a message and everything beneath it."""

    type: Literal["delete_branch"]
    conversation_id: Id
    message_id: Id


class Fork(Inbound):
    """A new conversation holding a copy of the path from the root to a message."""

    type: Literal["fork"]
    conversation_id: Id
    message_id: Id


# ---- search (docs/search.md) ----


class Search(Inbound):
    """Full-text search over the caller's conversations. The query's own limit (`too_large`)
    and the dates (ISO 8601) are checked by the search room, not here."""

    type: Literal["search"]
    query: str
    limit: Limit = 20
    cursor: Annotated[str, StringConstraints(max_length=200)] | None = None
    conversation_id: Id | None = None
    role: Literal["user", "assistant"] | None = None
    after: Annotated[str, StringConstraints(max_length=64)] | None = None
    before: Annotated[str, StringConstraints(max_length=64)] | None = None


# ---- attachments (docs/attachments.md) ----


class Upload(Inbound):
    """Announce a file; its `size` bytes follow as binary frames, answered by `attachment`."""

    type: Literal["upload"]
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    content_type: Annotated[str, StringConstraints(max_length=100)] | None = None  # a hint only
    size: Annotated[int, Field(ge=1, le=2**53)]


class CancelUpload(Inbound):
    """Abandon the upload in progress (its bytes so far are dropped)."""

    type: Literal["cancel_upload"]


# Every inbound class above is registered by now: the parser is built from the registry.
INBOUND_TYPES = frozenset(INBOUND_FRAMES)
_INBOUND: TypeAdapter[Inbound] = TypeAdapter(
    cast(Any, Annotated[Union[tuple(INBOUND_FRAMES.values())], Field(discriminator="type")])  # noqa: UP007
)


# A JSON escape of a UTF-16 surrogate: the only way a text frame (valid UTF-8, checked by
# websockets) can carry a lone surrogate, which no database or encoder accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# The request_id of a frame refused unread (rate limit): found without parsing the frame.
_REQUEST_ID = re.compile(r'"request_id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')
# JSON may spell one character in up to twelve (an emoji as `\ud83d\ude00`): a frame longer
# than this holds a message over the limit whatever its fields, and is refused unparsed.
_ESCAPED = 12
_ENVELOPE_CHARS = 16_384


def parse_frame(raw: str | bytes, *, max_message_chars: int) -> Inbound:
    """Parse one client frame, or raise the `ProtocolError` that says what is wrong with it.

    The error carries the frame's `request_id` when the frame was JSON with a valid one, so
    the answer can echo it without parsing the frame twice.
    """
    if isinstance(raw, bytes):
        raise BadFrame("binary frames are not accepted; send JSON text")
    if len(raw) > max_message_chars * _ESCAPED + _ENVELOPE_CHARS:
        raise TooLarge(f"frame is too long for a message of {max_message_chars} characters")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadJson(f"frame is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(data, dict):
        raise BadFrame("frame must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(data):
        raise BadFrame("text must be valid Unicode: a lone UTF-16 surrogate is not a character")
    request_id = data.get("request_id")
    rid = request_id if isinstance(request_id, str) and len(request_id) <= 128 else None
    try:
        return _validate(data, max_message_chars)
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _validate(data: dict[str, Any], max_message_chars: int) -> Inbound:
    kind = data.get("type")
    if not isinstance(kind, str):
        raise BadFrame("frame needs a string field 'type'")
    if kind not in INBOUND_TYPES:
        raise UnknownType(f"unknown frame type {kind[:40]!r}")
    if kind in ("send", "edit") and isinstance(data.get("content"), str):
        if len(data["content"]) > max_message_chars:
            raise TooLarge(f"message is longer than {max_message_chars} characters")
        if not data["content"].strip() and not data.get("attachments"):  # files may speak alone
            raise BadFrame("content must not be empty")
    try:
        return _INBOUND.validate_python(data)
    except ValidationError as exc:
        raise BadFrame(_describe(exc)) from exc


def _encodable(data: Any) -> bool:
    """Whether every string in `data` is valid Unicode (no lone surrogate)."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"][1:]) or "frame"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def request_id_of(raw: str | bytes) -> str | None:
    """The request_id of a frame refused unread, found without parsing it (best effort: the
    first `"request_id":"..."` in the frame's opening characters)."""
    if isinstance(raw, bytes):
        return None
    found = _REQUEST_ID.search(raw, 0, 1024)
    return found[1] if found else None


# ---- outbound -----------------------------------------------------------------------------


class Outbound(BaseModel):
    """A server event. Each subclass with a `type` literal is an event type, registered."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        OUTBOUND_FRAMES[type_of(cls)] = cls

    def encode(self) -> str:
        return self.model_dump_json(exclude_none=True)


OUTBOUND_FRAMES: dict[str, type[Outbound]] = {}


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None


class AttachmentView(BaseModel):
    """An uploaded file as clients see it; `kind` is image, text or pdf."""

    id: str
    filename: str
    content_type: str
    size: int
    kind: Literal["image", "text", "pdf"]
    width: int | None = None
    height: int | None = None
    pages: int | None = None


class MessageView(BaseModel):
    """A stored message as clients see it."""

    id: str
    seq: int
    role: Literal["user", "assistant", "tool", "system"]
    content: str
    status: Literal["complete", "streaming", "error", "cancelled", "interrupted", "queued"]
    created_at: str
    parent_id: str | None = None
    # All messages with the same parent, in seq order, itself included (history, catch-up).
    sibling_ids: list[str] | None = None
    model: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    attachments: list[AttachmentView] | None = None


class ConversationView(BaseModel):
    id: str
    title: str
    model: str | None = None
    system_prompt: str | None = None
    temperature: float | None = None
    created_at: str
    updated_at: str
    last_seq: int
    active_leaf_id: str | None = None


class Ack(Outbound):
    type: Literal["ack"] = "ack"
    conversation_id: str | None = None
    message_id: str | None = None
    seq: int | None = None
    request_id: str | None = None


class MessageEvent(Outbound):
    type: Literal["message"] = "message"
    conversation_id: str
    seq: int
    message: MessageView


class Typing(Outbound):
    type: Literal["typing"] = "typing"
    conversation_id: str
    active: bool


class Delta(Outbound):
    """A piece of a streaming reply at its exact character offset. Encoded by `delta_frame`,
    the hot path, without building this model; it declares the event's shape."""

    type: Literal["delta"] = "delta"
    conversation_id: str
    message_id: str
    offset: int
    text: str


class ToolCallEvent(Outbound):
    type: Literal["tool_call"] = "tool_call"
    conversation_id: str
    message_id: str
    call_id: str
    name: str
    arguments: Any
    server: str | None = None  # the MCP server the tool runs on; null for a Python tool

    def encode(self) -> str:
        return _with_server(self)


class ToolResultEvent(Outbound):
    type: Literal["tool_result"] = "tool_result"
    conversation_id: str
    message_id: str
    call_id: str
    ok: bool
    result: Any = None
    error: str | None = None
    server: str | None = None  # the MCP server the tool ran on; null for a Python tool

    def encode(self) -> str:
        return _with_server(self)


def _with_server(event: ToolCallEvent | ToolResultEvent) -> str:
    """`server` is always sent, null for a Python tool, so a client need not guess."""
    data = event.model_dump(mode="json", exclude_none=True)
    data["server"] = event.server
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class HistoryPage(Outbound):
    type: Literal["history"] = "history"
    conversation_id: str
    messages: list[MessageView]
    has_more: bool
    request_id: str | None = None


class ConversationsPage(Outbound):
    type: Literal["conversations"] = "conversations"
    items: list[ConversationView]
    has_more: bool
    request_id: str | None = None


class ConversationEvent(Outbound):
    """A conversation was renamed, configured or titled (`conversation`), or deleted."""

    type: Literal["conversation"] = "conversation"
    conversation_id: str
    conversation: ConversationView | None = None
    deleted: bool | None = None
    # The active path changed (edit, regenerate, switch_branch, delete_branch): it now ends
    # here (null: the conversation is empty). A client re-reads `history`.
    active_leaf_id: str | None = None


class ErrorEvent(Outbound):
    type: Literal["error"] = "error"
    code: str
    message: str
    request_id: str | None = None
    conversation_id: str | None = None


class SearchHit(BaseModel):
    """One hit: a message, a conversation title (no message_id, seq or role) or an attachment.
    `highlights` are [start, end) character ranges in `snippet`, which is plain text."""

    kind: Literal["message", "title", "attachment"]
    conversation_id: str
    conversation_title: str
    message_id: str | None
    seq: int | None
    role: str | None
    created_at: str
    snippet: str
    highlights: list[tuple[int, int]]
    on_active_path: bool


class SearchResults(Outbound):
    type: Literal["search_results"] = "search_results"
    items: list[SearchHit]
    next_cursor: str | None
    request_id: str | None = None

    def encode(self) -> str:
        # A hit's nulls are part of its shape (a title hit has no seq), so they are kept.
        return self.model_dump_json(exclude={"request_id"} if self.request_id is None else None)


class AttachmentEvent(Outbound):
    """An upload is complete and checked: the id a `send` may carry."""

    type: Literal["attachment"] = "attachment"
    attachment: AttachmentView
    request_id: str | None = None


class Pong(Outbound):
    type: Literal["pong"] = "pong"
    request_id: str | None = None


class DeltaFrame(str):
    """An encoded `delta` event that also remembers its parts.

    It is the JSON text itself (so the hub and sockets treat it as any frame), and a writer that
    has fallen behind can merge consecutive deltas of one message into one frame: offsets stay
    exact and a lagging client gets fewer, larger frames instead of an ever longer queue.
    """

    conversation_id: str
    message_id: str
    offset: int
    text: str

    def follows(self, previous: DeltaFrame) -> bool:
        return self.message_id == previous.message_id and self.offset == previous.offset + len(
            previous.text
        )


def delta_frame(conversation_id: str, message_id: str, offset: int, text: str) -> DeltaFrame:
    """The hottest frame of all, encoded without building a model (orjson: a third of
    `json.dumps`; text with a lone surrogate, which orjson refuses, goes through `json`)."""
    event = {
        "type": "delta",
        "conversation_id": conversation_id,
        "message_id": message_id,
        "offset": offset,
        "text": text,
    }
    try:
        encoded = orjson.dumps(event).decode()
    except TypeError:
        encoded = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    frame = DeltaFrame(encoded)
    frame.conversation_id = conversation_id
    frame.message_id = message_id
    frame.offset = offset
    frame.text = text
    return frame


def take_merged_delta(first: DeltaFrame, queue: deque[str]) -> tuple[str, int]:
    """Merge `first` with the deltas that continue it at the head of `queue`.

    Returns the frame to send and how many characters were taken off the queue.
    """
    parts = [first.text]
    last = first
    taken = 0
    while queue:
        head = queue[0]
        if type(head) is not DeltaFrame or not head.follows(last):
            break
        queue.popleft()
        taken += len(head)
        parts.append(head.text)
        last = head
    if len(parts) == 1:
        return first, 0
    return delta_frame(first.conversation_id, first.message_id, first.offset, "".join(parts)), taken


OUTBOUND_TYPES = tuple(OUTBOUND_FRAMES)
