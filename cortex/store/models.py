"""Tables. Wire schemas live apart, in `cortex.protocol`."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    """A UUIDv7 as 32 hex digits: time-ordered, so ids sort by creation."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return f"{value:032x}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # The last user message whose reply is settled; the ones above it are the reply queue.
    answered_seq: Mapped[int] = mapped_column(Integer, default=0)
    # The end of the active path (root to leaf) every client of the conversation shares.
    active_leaf_id: Mapped[str | None] = mapped_column(String(64))


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_seq", "conversation_id", "seq", unique=True),
        Index(
            "ix_messages_conversation_client_msg", "conversation_id", "client_msg_id", unique=True
        ),
        Index("ix_messages_client_msg_id", "client_msg_id"),
        Index("ix_messages_status", "status"),
        Index("ix_messages_conversation_role_seq", "conversation_id", "role", "seq"),
        # Siblings are read by parent (in seq order).
        Index("ix_messages_conversation_parent", "conversation_id", "parent_id", "seq"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("conversations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    tool_call_id: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="complete")
    client_msg_id: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(32))
    # What the `send` asked of this user message's reply: model, tools, temperature.
    reply_options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The message this one follows on its branch (NULL: the first of the conversation), and the
    # child last active beneath it, so a switch walks down the branch in O(path).
    parent_id: Mapped[str | None] = mapped_column(String(64))
    active_child_id: Mapped[str | None] = mapped_column(String(64))


class Token(Base):
    """An API token: only the sha256 of the secret is kept, so a stolen database grants nothing."""

    __tablename__ = "tokens"
    __table_args__ = (Index("ix_tokens_token_hash", "token_hash", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# ---- attachments (docs/attachments.md) -------------------------------------------------------


class Attachment(Base):
    """An uploaded file: `pending` while its bytes arrive, then `ready`.

    Content-addressed per owner: (owner, sha256) is unique, so one user's same file is stored
    once; another user's identical file is a row of its own (nobody learns what others hold).
    """

    __tablename__ = "attachments"
    __table_args__ = (Index("ix_attachments_owner_sha256", "owner", "sha256", unique=True),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    sha256: Mapped[str | None] = mapped_column(String(64))  # set when the upload is complete
    status: Mapped[str] = mapped_column(String(8), default="pending")
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    kind: Mapped[str | None] = mapped_column(String(8))
    size: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    pages: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)  # text files and PDFs: what search indexes
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AttachmentChunk(Base):
    """The bytes, in rows of `CHUNK_BYTES`: no side ever holds a whole file as one parameter."""

    __tablename__ = "attachment_chunks"

    attachment_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("attachments.id", ondelete="CASCADE"), primary_key=True
    )
    n: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class MessageAttachment(Base):
    """Which attachments a message carries, in order (messages may share one)."""

    __tablename__ = "message_attachments"
    __table_args__ = (Index("ix_message_attachments_attachment", "attachment_id"),)

    message_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    attachment_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("attachments.id", ondelete="CASCADE")
    )
