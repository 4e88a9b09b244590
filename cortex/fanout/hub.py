"""Who is subscribed to which conversation, and fan-out of encoded events to them.

Each event is encoded once by the publisher and handed to every subscriber's own queue
(`Subscriber.deliver` never blocks), so one slow socket never delays the others: a subscriber
whose queue overflows is dropped by its connection (see `server.Connection`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..protocol import delta_frame


class Subscriber(Protocol):
    """A client connection as the hub and the router see it."""

    def deliver(self, frame: str) -> None:
        """Queue one encoded frame for sending; must not block."""


# A conversation with many subscribers here gets its deltas at most every
# FLUSH_US_PER_SUBSCRIBER x subscribers (capped at FLUSH_MAX_S): each frame costs every one of them
# a socket write, and a reply watched by 1,000 people reads as well at 10 frames a second.
# A connection that has listed its user's conversations is subscribed to its user's topic too:
# the list's changes (new, fork, rename, delete) reach every tab's sidebar.
USER_TOPIC = "user:"


def user_topic(owner: str) -> str:
    return USER_TOPIC + owner


FLUSH_US_PER_SUBSCRIBER = 100
FLUSH_MAX_S = 0.1


@dataclass(slots=True)
class _PendingDelta:
    """Deltas of one reply published before the conversation's next frame is due, joined."""

    message_id: str
    offset: int
    end: int
    parts: list[str] = field(default_factory=list)
    timer: asyncio.Handle | None = None


class Hub:
    """In-process fan-out; `RedisHub` extends it across processes (docs/scaling.md).

    A conversation gets delta frames no more often than `delta_interval_s`
    (CORTEX_DELTA_INTERVAL_MS), or than its fan-out can afford (`FLUSH_US_PER_SUBSCRIBER`) when
    that is longer: deltas published before the next frame is due are joined into it (offsets
    stay exact), so a burst of chunks costs each subscriber one frame, not one per chunk. Any
    other event of the conversation sends them first, so order holds.
    """

    def __init__(self, *, delta_interval_s: float = 0.0) -> None:
        # The least time between two delta frames of a conversation, whatever its subscribers.
        self.delta_interval_s = delta_interval_s
        self._subs: dict[str, dict[Subscriber, None]] = {}  # insertion-ordered sets
        self._by_sub: dict[Subscriber, set[str]] = {}
        self._deltas: dict[str, _PendingDelta] = {}
        self._flushed_at: dict[str, float] = {}  # when each streaming reply's last frame left
        # Called with each control message from another process (e.g. a cancel).
        self.on_control: Callable[[dict[str, Any]], None] | None = None

    # ---- what a shared hub adds; one process needs none of it ----------------------------

    async def start(self) -> None:
        """Connect to whatever carries events between processes."""

    async def close(self) -> None:
        """Disconnect."""

    async def watch(self, conversation_id: str) -> None:
        """Make sure events of the conversation from other processes reach this one.

        Returns once they do; subscribe a local client (or a catch-up buffer) before calling
        it, so that nothing published after this returns is missed.
        """

    async def reply_text(self, message_id: str) -> str | None:
        """The text so far of a reply streaming in another process (None: not known here)."""
        return None

    def reply_finished(self, message_id: str) -> None:
        """The reply is stored whole: its text so far is no longer needed."""

    def control(self, message: dict[str, Any]) -> None:
        """Tell every other process something (e.g. cancel a reply one of them generates)."""

    def healthy(self) -> bool:
        return True

    async def housekeeping(self) -> None:
        """Now and then: let go of what nobody here needs any more."""

    def publish_delta(self, conversation_id: str, message_id: str, offset: int, text: str) -> None:
        """Publish a piece of a reply at its character offset, joined with the pieces published
        until the conversation's next frame is due."""
        pending = self._deltas.get(conversation_id)
        if pending is not None:
            if pending.message_id == message_id and pending.end == offset:
                pending.parts.append(text)
                pending.end += len(text)
                return
            self.flush(conversation_id)
        loop = asyncio.get_running_loop()
        now = loop.time()
        subscribers = len(self._subs.get(conversation_id, ()))
        due = self._flushed_at.get(conversation_id, 0.0) + max(
            self.delta_interval_s, min(FLUSH_MAX_S, subscribers * FLUSH_US_PER_SUBSCRIBER / 1e6)
        )
        if now >= due:
            # Out at once: the stream loop may not yield for a while (a burst of chunks), and
            # a later callback would hold the first words back until it does.
            self._flushed_at[conversation_id] = now
            self.emit_delta(conversation_id, message_id, offset, text)
            return
        pending = _PendingDelta(message_id, offset, offset + len(text), [text])
        pending.timer = loop.call_later(due - now, self.flush, conversation_id)
        self._deltas[conversation_id] = pending

    def flush(self, conversation_id: str) -> None:
        """Send the conversation's joined deltas now."""
        pending = self._deltas.pop(conversation_id, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        self._flushed_at[conversation_id] = asyncio.get_running_loop().time()
        text = pending.parts[0] if len(pending.parts) == 1 else "".join(pending.parts)
        self.emit_delta(conversation_id, pending.message_id, pending.offset, text)

    def emit_delta(self, conversation_id: str, message_id: str, offset: int, text: str) -> None:
        """Send one (joined) delta: to local subscribers here, to other processes too in
        `RedisHub`."""
        self.deliver_local(conversation_id, delta_frame(conversation_id, message_id, offset, text))

    def emit(self, conversation_id: str, frame: str) -> None:
        """Send one event (deltas before it are already out)."""
        self.deliver_local(conversation_id, frame)

    def publish_except(self, topic: str, frame: str, skip: Subscriber | None) -> None:
        """An event of a topic with no deltas (a user's), to all its subscribers but `skip`
        (the client that asked, which has its answer), on every process."""
        for sub in tuple(self._subs.get(topic, ())):
            if sub is not skip:
                sub.deliver(frame)
        self.relay(topic, frame)

    def relay(self, topic: str, frame: str) -> None:
        """Hand an event to the other processes' subscribers: there are none here."""

    def subscribe(self, conversation_id: str, sub: Subscriber) -> None:
        self._subs.setdefault(conversation_id, {})[sub] = None
        self._by_sub.setdefault(sub, set()).add(conversation_id)

    def unsubscribe(self, conversation_id: str, sub: Subscriber) -> None:
        subs = self._subs.get(conversation_id)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._subs[conversation_id]
        conversations = self._by_sub.get(sub)
        if conversations is not None:
            conversations.discard(conversation_id)
            if not conversations:
                del self._by_sub[sub]

    def drop(self, sub: Subscriber) -> None:
        """Forget a connection that has gone away."""
        for conversation_id in list(self._by_sub.get(sub, ())):
            self.unsubscribe(conversation_id, sub)

    def forget(self, conversation_id: str) -> None:
        """Drop every subscription to a conversation (it was deleted)."""
        for sub in tuple(self._subs.get(conversation_id, ())):
            self.unsubscribe(conversation_id, sub)

    def is_subscribed(self, conversation_id: str, sub: Subscriber) -> bool:
        return sub in self._subs.get(conversation_id, {})

    def subscriber_count(self, conversation_id: str | None = None) -> int:
        if conversation_id is not None:
            return len(self._subs.get(conversation_id, {}))
        # Conversations only: every connection also listens on its user's topic.
        return sum(
            len(subs) for topic, subs in self._subs.items() if not topic.startswith(USER_TOPIC)
        )

    def publish(self, conversation_id: str, frame: str) -> None:
        """Hand one encoded event to every subscriber of the conversation, in order."""
        if conversation_id in self._deltas:
            self.flush(conversation_id)
        self._flushed_at.pop(conversation_id, None)  # e.g. the reply ended: the next starts afresh
        self.emit(conversation_id, frame)

    def deliver_local(self, conversation_id: str, frame: str) -> None:
        """Hand one encoded event to this process's subscribers of the conversation."""
        subs = self._subs.get(conversation_id)
        if not subs:
            return
        for sub in tuple(subs):
            sub.deliver(frame)
