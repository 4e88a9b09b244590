"""What is going on now in this process, per conversation, shared by the pipeline's rooms.

The lock orders each store-and-publish of a conversation (so a subscriber's catch-up sees every
stored message exactly once, in seq order); `current` is the reply being answered, and `active`
its text between checkpoints, which the reads serve to clients that join mid-reply.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ActiveReply:
    """The row a reply is streaming into: its text lives here between checkpoints."""

    message_id: str
    seq: int
    parts: list[str] = field(default_factory=list)
    length: int = 0
    checkpoint: asyncio.Future[None] | None = None  # the checkpoint write in flight, if any

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


@dataclass(slots=True)
class PendingReply:
    """The reply to one stored user message, from the moment a worker takes it up."""

    seq: int
    model: str | None
    tools: tuple[str, ...] | None
    cancel_requested: bool = False
    interrupted: bool = False  # stopped by a shutdown: stored as `interrupted`, not `cancelled`
    # The part of the reply a cancel may stop (the model stream, a turn's tool calls). Storing
    # the outcome is never cancelled, so every reply ends with its final `message`.
    interruptible: asyncio.Future[Any] | None = None
    temperature: float | None = None  # this reply only; else the conversation's
    request_id: str | None = None  # of the send, for the logs
    connection_id: int | None = None
    first_seq: int = 0  # of the reply's first row: an edit stored after it supersedes it

    def stop(self, *, interrupted: bool = False) -> None:
        """Stop the model stream (a cancel, or a shutdown when `interrupted`)."""
        if interrupted:
            self.interrupted = True
        else:
            self.cancel_requested = True
        if self.interruptible is not None:
            self.interruptible.cancel()

    @property
    def stopped(self) -> bool:
        return self.cancel_requested or self.interrupted


class Live:
    """Per conversation: its lock, the reply being answered and that reply's streaming row."""

    def __init__(self) -> None:
        self.current: dict[str, PendingReply] = {}
        self.active: dict[str, ActiveReply] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def lock(self, key: str) -> asyncio.Lock:
        """The lock under which a conversation's messages are stored and published."""
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    def text_of(self, conversation_id: str, message_id: str) -> str | None:
        """The live text of a row streaming here, or None."""
        active = self.active.get(conversation_id)
        if active is not None and active.message_id == message_id:
            return active.text()
        return None
