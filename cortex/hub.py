"""Who is subscribed to which conversation, and fan-out of encoded events to them.

Each event is encoded once by the publisher and handed to every subscriber's own queue
(`Subscriber.deliver` never blocks), so one slow socket never delays the others: a subscriber
whose queue overflows is dropped by its connection (see `server.Connection`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .protocol import delta_frame


class Subscriber(Protocol):
    """A client connection as the hub and the router see it."""

    def deliver(self, frame: str) -> None:
        """Queue one encoded frame for sending; must not block."""


class Hub:
    """In-process fan-out; `RedisHub` extends it across processes (docs/scaling.md)."""

    def __init__(self) -> None:
        self._subs: dict[str, dict[Subscriber, None]] = {}  # insertion-ordered sets
        self._by_sub: dict[Subscriber, set[str]] = {}
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

    def publish_delta(self, conversation_id: str, message_id: str, offset: int, text: str) -> None:
        """Publish a piece of a reply at its character offset."""
        self.publish(conversation_id, delta_frame(conversation_id, message_id, offset, text))

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
        return sum(len(subs) for subs in self._subs.values())

    def publish(self, conversation_id: str, frame: str) -> None:
        """Hand one encoded event to every subscriber of the conversation, in order."""
        self.deliver_local(conversation_id, frame)

    def deliver_local(self, conversation_id: str, frame: str) -> None:
        """Hand one encoded event to this process's subscribers of the conversation."""
        subs = self._subs.get(conversation_id)
        if not subs:
            return
        for sub in tuple(subs):
            sub.deliver(frame)
