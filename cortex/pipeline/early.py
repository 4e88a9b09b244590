"""A reply's model request, begun while its row commits.

`Store.start_reply` reads what the model sees, then writes the reply's row and commits. The
provider's wait for its first token need not wait for that commit: `EarlyTurn` hears the context
from inside the transaction and starts the first turn's stream at once. On one process, a
message that nothing waits before is heard even sooner, inside `add_user_message`'s own
transaction: the intake hands that `EarlyTurn` to the conversation's worker (`Workers.kick`),
whose next start takes it. The stream's events wait behind a gate until the turn adopts it:
after the commit, and only if the turn would make the very same request. Otherwise (a
transaction failed, nothing waited, the request differs, the reply was stopped first) the stream
is cancelled, which closes its HTTP request, and the turn makes its own. Every reply takes this
one path; the tool loop's later turns start after their commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..ops.telemetry import ReplyTrace
    from ..store.models import Conversation, Message
    from ..store.repo import ContextMessage
    from .live import ActiveReply

log = logging.getLogger("cortex.router")


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """What a model turn asks the model: the early stream is adopted only if it asked the same."""

    messages: list[dict[str, Any]]
    model: str
    system_prompt: str
    temperature: float | None
    tools: list[dict[str, Any]] | None
    # What `messages` were built from: a turn with an equal context reuses them.
    context: list[ContextMessage] = field(default_factory=list, compare=False)


class Opened(NamedTuple):
    """What a turn's stream needs to publish: it gets it once the row is committed."""

    active: ActiveReply
    result: Any  # reply.TurnResult (it fills the calls, usage and finish)
    trace: ReplyTrace


class Opening(NamedTuple):
    """What `start_reply` read, copied inside its transaction for the event loop."""

    conversation_id: str
    owner: str
    model: str | None
    system_prompt: str | None
    temperature: float | None
    options: dict[str, Any]  # the reply's options: the message's, a regeneration's over them
    context: list[ContextMessage]


# Starts a turn's stream from an opening: its request, its gate and its task (None: it can't).
Starter = Callable[
    [Opening], "tuple[TurnRequest, asyncio.Future[Opened], asyncio.Future[None]] | None"
]


class EarlyTurn:
    """The first turn's stream of one reply, begun from inside `add_user_message` (a message
    nothing waits before) or `start_reply`, whichever hears the context first."""

    def __init__(self, start: Starter) -> None:
        self._loop = asyncio.get_running_loop()
        self._start = start
        self._closed = False
        self._heard = False  # one request: a later hook (the worker's) keeps the first
        self.started_at: float | None = None  # when its request began (time.monotonic)
        self.request: TurnRequest | None = None
        self._gate: asyncio.Future[Opened] | None = None
        self._task: asyncio.Future[None] | None = None

    def on_context(
        self,
        conv: Conversation,
        message: Message,
        row_options: dict[str, Any] | None,
        context: list[ContextMessage],
    ) -> None:
        """The store's hook, on the transaction's thread: copy, and let the loop start."""
        if self._heard:
            return
        self._heard = True
        opening = Opening(
            conv.id,
            conv.owner,
            conv.model,
            conv.system_prompt,
            conv.temperature,
            (message.reply_options or {}) | (row_options or {}),
            list(context),
        )
        self._loop.call_soon_threadsafe(self._begin, opening)

    def _begin(self, opening: Opening) -> None:
        if self._closed:
            return
        try:
            made = self._start(opening)
        except Exception:
            log.exception("starting the model request early failed")  # the turn starts its own
            return
        if made is not None:
            self.started_at = time.monotonic()
            self.request, self._gate, self._task = made
            # Read if it ends before it is adopted (a provider error): the adopter sees it anyway.
            self._task.add_done_callback(_retrieve)

    def messages_for(
        self, context: list[ContextMessage], model: str
    ) -> list[dict[str, Any]] | None:
        """The messages of the request begun early, if built for `model` from the same context:
        the turn need not build (and trim) them again. None: the turn builds its own."""
        request = self.request
        if request is None or request.model != model or request.context != context:
            return None
        return request.messages

    def take(
        self, request: TurnRequest
    ) -> tuple[asyncio.Future[None], asyncio.Future[Opened]] | None:
        """The stream begun early, if it asked what the turn asks; else cancelled, and None."""
        task, gate = self._task, self._gate
        if task is None or gate is None or task.cancelled() or request != self.request:
            self.cancel()
            return None
        self._closed = True
        self._task = self._gate = None
        return task, gate

    def cancel(self) -> None:
        """Not adopted (or not wanted): stop the stream; its HTTP request is closed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = self._gate = None


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
