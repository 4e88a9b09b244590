"""The Router: one user message in, one stored, streamed (and tool-using) reply out.

It knows nothing of sockets or SQL: it gets a `Store`, an LLM backend, a hub and (optionally)
a tool registry, and talks to clients only through `Subscriber.deliver` and `Hub.publish`.
Pipeline per `send` (DESIGN.md): validate, deduplicate by client_msg_id, store and ack, typing
on, stream the reply with checkpoints, run tools, store the final reply, typing off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .config import Settings
from .errors import BadFrame, CortexError, Internal, NotFound, Unavailable
from .hub import Hub, Subscriber
from .llm import Finish, LlmBackend, TextDelta, ToolCall, ToolCalls, UsageInfo, parse_arguments
from .protocol import (
    Ack,
    ConversationsPage,
    DeltaFrame,
    ErrorEvent,
    HistoryPage,
    Send,
    ToolCallEvent,
    ToolResultEvent,
    Typing,
    delta_frame,
)
from .store.repo import opened_reply_fields
from .telemetry import ReplyTrace, Telemetry
from .views import conversation_view, message_event, message_view, openai_messages

if TYPE_CHECKING:
    from .leases import Lease, RedisLeases
    from .store.models import Conversation, Message
    from .store.repo import ContextMessage, Store, WaitingTurn
    from .tools import ToolRegistry, ToolResult

log = logging.getLogger("cortex.router")

# How long one reply may read chunks that are already buffered before the other tasks get the
# loop. Longer: fewer, larger frames; shorter: a loaded process starts new replies sooner
# (bench/stream_overhead.py at 50 streams: 10 ms gives 69 frames per 1,000-chunk reply and the
# first deltas at 2.1 s, 50 ms gives 14 frames and 4.0 s). Fan-out frames are paced by the hub.
STREAM_SLICE_S = 0.01
# ...and with many replies at once, slices short enough that all of them together hold the loop
# for at most this long: every reply gets a turn (and every socket a read) within about a second,
# well inside a stall timeout (bench/soak.py, 200 clients, 2 s timeout: 10 ms slices for every
# reply made 92 false stalls where there had been 7).
STREAM_ROUND_S = 1.0

TOOL_LIMIT_TEXT = "I stopped: the limit of {n} tool rounds for one reply was reached."


@dataclass(slots=True)
class ActiveReply:
    """The reply being streamed in a conversation: its text lives here between checkpoints."""

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
    """A stored user message waiting for its answer."""

    seq: int
    model: str | None
    tools: tuple[str, ...] | None
    cancel_requested: bool = False
    interrupted: bool = False  # stopped by a shutdown: stored as `interrupted`, not `cancelled`
    # The part of the reply a cancel may stop (the model stream). Storing the outcome is never
    # cancelled, so every reply ends with its final `message`.
    interruptible: asyncio.Task[None] | None = None
    temperature: float | None = None  # this reply only; else the conversation's
    request_id: str | None = None  # of the send, for the logs
    connection_id: int | None = None


@dataclass(slots=True)
class _Plan:
    """How one reply is generated: settled once, when it starts."""

    model: str
    system_prompt: str
    temperature: float | None
    specs: list[dict[str, Any]]
    trace: ReplyTrace


@dataclass(slots=True)
class _TurnResult:
    message_id: str = ""  # the assistant row, once stored
    text: str = ""
    calls: tuple[ToolCall, ...] = ()
    usage: UsageInfo | None = None
    finish: str | None = None


@dataclass(slots=True)
class _Turn:
    """A model turn under way: its stream reads the model while its row is stored."""

    result: _TurnResult
    # Set once the row is stored and announced: the stream's first words wait for it.
    row_ready: asyncio.Future[ActiveReply]
    stream: asyncio.Future[None] | None
    opened: Message | None = None  # the row, if it was stored with the user message


@dataclass(slots=True)
class _Opening:
    """A reply started by `send` before any frame is written (its row stored with the message)."""

    waiting: WaitingTurn
    pending: PendingReply
    plan: _Plan
    turn: _Turn


class Router:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        llm: LlmBackend,
        hub: Hub,
        tools: ToolRegistry | None = None,
        telemetry: Telemetry | None = None,
        leases: RedisLeases | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.hub = hub
        self.tools = tools
        self.telemetry = telemetry if telemetry is not None else Telemetry(settings)
        # Several processes share the conversations: a reply needs the conversation's lease.
        # Alone, the one worker per conversation below is lease enough.
        self.leases = leases
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()  # conversations with messages stored since last looked
        self._cancel_next: set[str] = set()  # a cancel that came before its reply started
        self._active: dict[str, ActiveReply] = {}
        self._current: dict[str, PendingReply] = {}
        self.closing = False  # set by drain(): new messages are refused
        # Sends past the closing check: drain() waits for them, since one may start a reply.
        self._sends = 0
        self._no_sends = asyncio.Event()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        hub.on_control = self._control

    def _lock(self, conversation_id: str) -> asyncio.Lock:
        # Storing a message and publishing it happen under this lock, and so does a subscribe's
        # catch-up, so a subscriber sees every stored message exactly once, in seq order.
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[conversation_id] = lock
        return lock

    # ---- client requests ----------------------------------------------------------------

    async def send(self, owner: str, frame: Send, client: Subscriber) -> None:
        """Store a user message, ack it, and queue its reply (steps 1-3 of the pipeline)."""
        model = frame.model
        if model is not None and not self.settings.is_model_allowed(model):
            raise BadFrame(f"model {model!r} is not enabled on this server")
        tools = tuple(frame.tools) if frame.tools is not None else None
        if tools:
            known = set(self.tools.names) if self.tools is not None else set()
            unknown = [name for name in tools if name not in known]
            if unknown:
                raise BadFrame(f"unknown tools: {', '.join(unknown)}")
        if self.closing:
            raise Unavailable("the server is shutting down; send again on another connection")
        self._sends += 1
        self._no_sends.clear()
        try:
            await self._send(owner, frame, client, model, tools)
        finally:
            self._sends -= 1
            if not self._sends:
                self._no_sends.set()

    async def _send(
        self,
        owner: str,
        frame: Send,
        client: Subscriber,
        model: str | None,
        tools: tuple[str, ...] | None,
    ) -> None:
        connection_id = getattr(client, "id", None)
        if frame.conversation_id:
            # Replies to earlier messages may come from another process: listen first.
            await self.hub.watch(frame.conversation_id)
            lock: asyncio.Lock | _NoLock = self._lock(frame.conversation_id)
        elif frame.client_msg_id:
            # Two connections retrying one new-conversation send must not create two.
            lock = self._lock(f"new:{owner}:{frame.client_msg_id}")
        else:
            lock = _NO_LOCK
        async with lock:
            # A message whose reply can start at once (nothing older waits, no worker here) is
            # stored with its reply's row. One process alone does this (with peers, the lease
            # holder opens the row).
            opening = self.leases is None and (
                frame.conversation_id is None or frame.conversation_id not in self._workers
            )
            stored = await self.store.add_user_message(
                owner=owner,
                conversation_id=frame.conversation_id,
                content=frame.content,
                client_msg_id=frame.client_msg_id,
                model=model,
                system_prompt=frame.system_prompt,
                temperature=frame.temperature,
                reply_options=_reply_options(
                    model,
                    tools,
                    frame.temperature,
                    request_id=frame.request_id,
                    connection_id=connection_id,
                ),
                open_reply=self.llm.default_model() if opening else None,
            )
            if stored is None:
                raise NotFound("no such conversation")
            conv, message, created = stored.conversation, stored.message, stored.created
            # If the periodic sweep saw the message first and started the conversation's
            # worker, that worker reads the row back and answers into it. A reply started here
            # is seen through even if the server began closing: drain() waits for sends.
            opened = stored.reply is not None and conv.id not in self._workers
            if opened:
                # The model is called first; the frames below go out while it thinks.
                self.kick(conv.id, self._open(self.store.opening_turn(stored)))
            self.hub.subscribe(conv.id, client)
            client.deliver(
                Ack(
                    conversation_id=conv.id,
                    message_id=message.id,
                    seq=message.seq,
                    request_id=frame.request_id,
                ).encode()
            )
            if not created:
                return  # an idempotent retry: acknowledged again, nothing else
            self.hub.publish(conv.id, message_event(message))
        if frame.conversation_id is None:
            await self.hub.watch(conv.id)
        self.telemetry.message_stored(
            user=owner,
            conversation_id=conv.id,
            seq=message.seq,
            content=frame.content,
            created=frame.conversation_id is None,
            request_id=frame.request_id,
            connection_id=connection_id,
        )
        if not opened:
            self.kick(conv.id)

    async def subscribe(
        self,
        owner: str,
        conversation_id: str,
        after_seq: int | None,
        client: Subscriber,
        request_id: str | None = None,
    ) -> None:
        """Catch up from `after_seq`, then the reply in progress so far, then live events.

        Events published while the catch-up reads the database wait in a buffer and follow
        it, so nothing falls between the two, whichever process publishes them.
        """
        if await self.store.get_conversation(conversation_id, owner=owner) is None:
            raise NotFound("no such conversation")
        buffer = _CatchUpBuffer()
        self.hub.subscribe(conversation_id, buffer)  # before anything is read
        try:
            await self.hub.watch(conversation_id)
            if after_seq is not None:
                cursor = after_seq
                while True:
                    rows, more = await self.store.messages(
                        conversation_id, after_seq=cursor, limit=200
                    )
                    for row in rows:
                        streaming = row.status == "streaming"
                        client.deliver(message_event(row, content="" if streaming else None))
                    if not more or not rows:
                        break
                    cursor = rows[-1].seq
            if await self._replying(conversation_id):
                client.deliver(Typing(conversation_id=conversation_id, active=True).encode())
            self.hub.flush(conversation_id)  # joined deltas not yet out land in the buffer
            message_id, text = await self._text_so_far(conversation_id)
            if text:
                client.deliver(delta_frame(conversation_id, message_id, 0, text))
        except BaseException:
            self.hub.unsubscribe(conversation_id, buffer)
            raise
        # From here on no await: the buffer hands over to the client in one step.
        self.hub.unsubscribe(conversation_id, buffer)
        self.hub.subscribe(conversation_id, client)
        buffer.replay(client, message_id, len(text))
        # The ack closes the catch-up: everything after it is live.
        client.deliver(Ack(conversation_id=conversation_id, request_id=request_id).encode())

    async def resync(self, conversation_id: str, since: datetime) -> None:
        """Events of the conversation may have been lost since `since` (Redis was away): hand
        this process's subscribers every message that changed meanwhile, and the typing state.
        A reply still streaming goes on at offsets past what they have: they resubscribe."""
        deliver = self.hub.deliver_local
        for row in await self.store.messages_changed_since(conversation_id, since):
            deliver(conversation_id, message_event(row))
        active = await self._replying(conversation_id)
        deliver(conversation_id, Typing(conversation_id=conversation_id, active=active).encode())

    async def _replying(self, conversation_id: str) -> bool:
        if conversation_id in self._current:  # maybe in a tool, with nothing streaming
            return True
        return self.leases is not None and await self.leases.held(conversation_id)

    async def _text_so_far(self, conversation_id: str) -> tuple[str, str]:
        """(message id, text) of the reply in progress: here, or from the process making it."""
        active = self._active.get(conversation_id)
        if active is not None:
            return active.message_id, active.text()
        if self.leases is None:
            return "", ""
        row = await self.store.streaming_message(conversation_id)
        if row is None:
            return "", ""
        text = await self.hub.reply_text(row.id)
        if text is None or len(text) < len(row.content):
            text = row.content  # the last checkpoint (Redis lost it, or never had it)
        return row.id, text

    async def history(
        self,
        owner: str,
        conversation_id: str,
        *,
        before_seq: int | None,
        limit: int,
        request_id: str | None = None,
    ) -> str:
        if await self.store.get_conversation(conversation_id, owner=owner) is None:
            raise NotFound("no such conversation")
        rows, more = await self.store.messages(
            conversation_id, before_seq=before_seq, limit=min(limit, self.settings.history_page_max)
        )
        return HistoryPage.model_construct(
            conversation_id=conversation_id,
            messages=[self._live_view(r) for r in rows],
            has_more=more,
            request_id=request_id,
        ).encode()

    def _live_view(self, row: Any) -> Any:
        active = self._active.get(row.conversation_id)
        if active is not None and active.message_id == row.id:
            return message_view(row, content=active.text())
        return message_view(row)

    async def conversations(
        self, owner: str, *, before: str | None, limit: int, request_id: str | None = None
    ) -> str:
        rows, more = await self.store.conversations(owner=owner, before=before, limit=limit)
        return ConversationsPage.model_construct(
            items=[conversation_view(r) for r in rows], has_more=more, request_id=request_id
        ).encode()

    async def cancel(self, owner: str, conversation_id: str) -> bool:
        """Stop the reply in progress (or the next one, if it has not started): its text so far
        is stored as `cancelled`. The process generating it may be another one."""
        if await self.store.get_conversation(conversation_id, owner=owner) is None:
            raise NotFound("no such conversation")
        if self._cancel_here(conversation_id):
            return True
        if self.leases is not None:
            self.hub.control({"op": "cancel", "conversation_id": conversation_id})
            return True
        return False

    def _cancel_here(self, conversation_id: str) -> bool:
        target = self._current.get(conversation_id)
        if target is None:
            if conversation_id not in self._workers:
                return False
            self._cancel_next.add(conversation_id)  # the worker has yet to start the reply
            return True
        if target.cancel_requested:
            return False
        target.cancel_requested = True
        if target.interruptible is not None:
            target.interruptible.cancel()
        return True

    def _control(self, message: dict[str, Any]) -> None:
        """A control message from another process."""
        conversation_id = message.get("conversation_id")
        if message.get("op") == "cancel" and isinstance(conversation_id, str):
            self._cancel_here(conversation_id)

    async def abandon(self, conversation_id: str, *, grace: float = 10.0) -> None:
        """Cancel the conversation's reply and wait for it to stop (it is being deleted):
        afterwards no reply of it writes to the store."""
        if self.leases is not None:
            self.hub.control({"op": "cancel", "conversation_id": conversation_id})
        current = self._current.get(conversation_id)
        worker = self._workers.get(conversation_id)
        if worker is None:
            return
        if current is not None:
            current.cancel_requested = True
        worker.cancel()
        await asyncio.wait({worker}, timeout=grace)

    # ---- reply generation ---------------------------------------------------------------

    def kick(self, conversation_id: str, first: _Opening | None = None) -> None:
        """Messages may wait in the conversation: make sure a worker looks.

        `first`: a reply `send` already started; the new worker goes on with it.
        """
        if self.closing and first is None:
            return
        self._dirty.add(conversation_id)
        if conversation_id not in self._workers:
            task = asyncio.create_task(
                self._work(conversation_id, first), name=f"reply:{conversation_id}"
            )
            self._workers[conversation_id] = task

    async def _work(self, conversation_id: str, first: _Opening | None = None) -> None:
        """Answer the waiting messages of one conversation, one after another, in seq order.

        The queue is the database (user messages above `answered_seq`), so any process may
        answer them; with several, only the holder of the conversation's lease does.
        """
        try:
            if self.leases is None:
                await self._answer_waiting(conversation_id, first=first)
                return
            while not self.closing:
                lease = await self.leases.acquire(conversation_id)
                if lease is None:
                    return  # the holder answers it: it looks again after letting go
                try:
                    await self._answer_waiting(conversation_id, lease)
                finally:
                    await lease.release()
                # A message stored while we held the lease may have been left to us: look again.
                self._dirty.discard(conversation_id)
                if await self.store.next_unanswered(conversation_id) is None:
                    if conversation_id not in self._dirty:
                        return
        except Exception:
            log.exception("answering conversation %s failed", conversation_id)
        finally:
            self._workers.pop(conversation_id, None)
            self._cancel_next.discard(conversation_id)

    async def _answer_waiting(
        self, conversation_id: str, lease: Lease | None = None, first: _Opening | None = None
    ) -> None:
        if lease is not None:
            # The previous holder died mid-reply: what it streamed is kept as `interrupted`.
            for row in await self.store.settle_streaming(conversation_id):
                self.hub.publish(conversation_id, message_event(row))
        # A reply already started is seen through, even if the server began closing since.
        while first is not None or (not self.closing and (lease is None or not lease.lost)):
            self._dirty.discard(conversation_id)
            opening, first = first, None
            if opening is not None:
                waiting, pending = opening.waiting, opening.pending
            else:
                read = await self.store.waiting_turn(conversation_id)
                if read is None:
                    if conversation_id in self._dirty:
                        continue  # stored while we looked
                    return
                waiting, pending = read, self._pending_reply(conversation_id, read.message)
            message = waiting.message
            self._current[conversation_id] = pending
            if lease is not None:
                lease.on_lost = lambda p=pending: _interrupt(p)
            try:
                await self._reply(waiting, pending, opening)
            except Exception:
                log.exception("reply failed in conversation %s", conversation_id)
            finally:
                self._active.pop(conversation_id, None)
                self._current.pop(conversation_id, None)
            if lease is not None and lease.lost:
                return  # another process owns the conversation now, and settles the row
            await asyncio.shield(self.store.mark_answered(conversation_id, message.seq))

    def _pending_reply(self, conversation_id: str, message: Message) -> PendingReply:
        options = message.reply_options or {}
        tools = options.get("tools")
        pending = PendingReply(
            seq=message.seq,
            model=options.get("model"),
            tools=tuple(tools) if tools is not None else None,
            temperature=options.get("temperature"),
            request_id=options.get("request_id"),
            connection_id=options.get("connection_id"),
        )
        if conversation_id in self._cancel_next:
            self._cancel_next.discard(conversation_id)
            pending.cancel_requested = True
        return pending

    async def sweep(self) -> None:
        """Pick up conversations whose messages wait with nobody answering: after a restart,
        or when the process that held them died (its lease expired)."""
        for conversation_id in await self.store.conversations_awaiting_reply():
            if conversation_id not in self._workers:
                self.kick(conversation_id)

    def _open(self, waiting: WaitingTurn) -> _Opening:
        """Start a reply whose row was stored with its message.

        Its model call goes out before the ack, the message and typing are written (they go
        out while the provider thinks): that is on the way to the first words.
        """
        conversation_id = waiting.conversation.id
        pending = self._pending_reply(conversation_id, waiting.message)
        plan = self._plan(waiting.conversation, pending)
        turn = self._start_turn(conversation_id, pending, plan, waiting.context, waiting.reply)
        return _Opening(waiting, pending, plan, turn)

    def _plan(self, conv: Conversation, pending: PendingReply) -> _Plan:
        model = pending.model or conv.model or self.llm.default_model()
        temperature = pending.temperature
        return _Plan(
            model=model,
            system_prompt=conv.system_prompt or self.settings.system_prompt,
            temperature=temperature if temperature is not None else conv.temperature,
            specs=self._tool_specs(pending.tools),
            trace=self.telemetry.reply(
                conversation_id=conv.id,
                model=model,
                user_seq=pending.seq,
                request_id=pending.request_id,
                connection_id=pending.connection_id,
            ),
        )

    async def _reply(
        self, waiting: WaitingTurn, pending: PendingReply, opening: _Opening | None = None
    ) -> None:
        conversation_id = waiting.conversation.id
        plan = opening.plan if opening is not None else self._plan(waiting.conversation, pending)
        model = plan.model
        self.hub.publish(
            conversation_id, Typing(conversation_id=conversation_id, active=True).encode()
        )
        try:
            rounds = 0
            # The first turn's context is known (and maybe its row); later turns read theirs.
            turn: _Turn | None = (
                opening.turn
                if opening is not None
                else self._start_turn(
                    conversation_id, pending, plan, waiting.context, waiting.reply
                )
            )
            while True:
                result = await self._turn(conversation_id, pending, plan, turn)
                turn = None
                if not result.calls or pending.cancel_requested or pending.interrupted:
                    return
                rounds += 1
                await self._run_tools(
                    conversation_id, result.message_id, result.calls, pending.tools, plan.trace
                )
                if rounds >= self.settings.max_tool_rounds:
                    await self._tool_limit_reached(conversation_id, model)
                    plan.trace.failed("tool_error")
                    return
        finally:
            self.hub.publish(
                conversation_id, Typing(conversation_id=conversation_id, active=False).encode()
            )
            plan.trace.end()

    def _tool_specs(self, names: tuple[str, ...] | None) -> list[dict[str, Any]]:
        if self.tools is None:
            return []
        return self.tools.specs(names)

    async def _turn(
        self,
        conversation_id: str,
        pending: PendingReply,
        plan: _Plan,
        turn: _Turn | None,
    ) -> _TurnResult:
        """One model turn into one assistant row: streamed, checkpointed, then finalised.

        The model is called as soon as the context is read (`turn`: already called). Its
        first words wait for the row they stream into, which is stored meanwhile (a database
        round trip less before them), unless the turn started with its row already stored.
        """
        if turn is None:
            context = await self.store.context(conversation_id, upto_user_seq=pending.seq)
            turn = self._start_turn(conversation_id, pending, plan, context, None)
        result, stream, row = turn.result, turn.stream, turn.opened
        if row is None:
            try:
                async with self._lock(conversation_id):
                    row = await self.store.add_message(
                        conversation_id=conversation_id, **opened_reply_fields(plan.model)
                    )
                    self.hub.publish(conversation_id, message_event(row))
            except BaseException:
                if stream is not None:
                    pending.interruptible = None
                    stream.cancel()
                    await asyncio.gather(stream, return_exceptions=True)
                raise
        else:
            self.hub.publish(conversation_id, message_event(row))
        active = ActiveReply(message_id=row.id, seq=row.seq)
        self._active[conversation_id] = active
        result.message_id = row.id
        if not turn.row_ready.done():  # a cancelled stream takes its wait for the row with it
            turn.row_ready.set_result(active)
        status, error = "complete", None
        try:
            if stream is None:
                raise asyncio.CancelledError  # stopped before it started: nothing to stream
            try:
                await stream
            finally:
                pending.interruptible = None
        except asyncio.CancelledError:
            status = "interrupted" if pending.interrupted else "cancelled"
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                status = "cancelled" if pending.cancel_requested else "interrupted"
                raise  # the worker itself is being stopped; the row is still stored below
            if not (pending.cancel_requested or pending.interrupted):
                raise
        except CortexError as exc:
            status, error = "error", exc
        except Exception as exc:
            log.exception("reply stream failed")
            status, error = "error", Internal("internal error while generating the reply")
            error.__cause__ = exc
        finally:
            if active.checkpoint is not None:
                # The last checkpoint must land before the final write, never after it.
                await asyncio.gather(active.checkpoint, return_exceptions=True)
            result.text = active.text()
            usage = result.usage
            plan.trace.turn_finished(
                status=status,
                error_code=error.code if error is not None else None,
                text=result.text,
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
                completion_tokens=usage.completion_tokens if usage is not None else None,
                cost_usd=usage.cost_usd if usage is not None else None,
            )
            await self._finish_row(conversation_id, row.id, active, result, status, error)
        return result

    def _start_turn(
        self,
        conversation_id: str,
        pending: PendingReply,
        plan: _Plan,
        context: list[ContextMessage],
        opened: Message | None,
    ) -> _Turn:
        """Call the model (unless the reply was stopped first); `_turn` sees the turn through."""
        result = _TurnResult()
        row_ready: asyncio.Future[ActiveReply] = asyncio.get_running_loop().create_future()
        stream: asyncio.Future[None] | None = None
        if not (pending.cancel_requested or pending.interrupted):
            messages = self.llm_trim(openai_messages(context), plan.model)
            stream = asyncio.ensure_future(
                self._stream(conversation_id, row_ready, result, messages, plan)
            )
            pending.interruptible = stream
        return _Turn(result, row_ready, stream, opened)

    def llm_trim(self, messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        trim = getattr(self.llm, "trim", None)
        return trim(messages, model) if trim is not None else messages

    async def _stream(
        self,
        conversation_id: str,
        row_ready: asyncio.Future[ActiveReply],
        result: _TurnResult,
        messages: list[dict[str, Any]],
        plan: _Plan,
    ) -> None:
        active: ActiveReply | None = None
        interval = self.settings.checkpoint_ms / 1000
        next_checkpoint = time.monotonic() + interval
        next_yield = 0.0
        publish = self.hub.publish_delta
        async for event in self.llm.stream(
            messages,
            model=plan.model,
            system_prompt=plan.system_prompt,
            temperature=plan.temperature,
            tools=plan.specs or None,
        ):
            if active is None:
                active = await row_ready  # the row the reply streams into is stored
            if isinstance(event, TextDelta):
                text = event.text
                if not active.length:
                    plan.trace.first_token()
                publish(conversation_id, active.message_id, active.length, text)
                active.parts.append(text)
                active.length += len(text)
                now = time.monotonic()
                if now >= next_checkpoint and (
                    active.checkpoint is None or active.checkpoint.done()
                ):
                    # Checkpoints bound what a crash can lose. They run beside the stream (one
                    # at a time), so a slow database write never becomes a gap in the reply.
                    active.checkpoint = asyncio.ensure_future(
                        self.store.update_message(active.message_id, content=active.text())
                    )
                    next_checkpoint = now + interval
                if now >= next_yield:
                    # Chunks that arrive in a burst are read without the loop ever running the
                    # socket writers: give them a turn at the first delta (so the first words go
                    # out at once), then after each slice of reading. The slice is timed from
                    # when the turn comes back: on a busy loop that is long after `now`, and a
                    # stream that yielded at every chunk would cost a frame per chunk (at 50
                    # streams, 958 frames of 1,000 chunks each, throughput 0.62 of LiteLLM's).
                    await asyncio.sleep(0)
                    replies = len(self._active) or 1
                    next_yield = time.monotonic() + min(STREAM_SLICE_S, STREAM_ROUND_S / replies)
            elif isinstance(event, ToolCalls):
                result.calls = event.calls
            elif isinstance(event, UsageInfo):
                result.usage = event
            elif isinstance(event, Finish):
                result.finish = event.reason

    async def _finish_row(
        self,
        conversation_id: str,
        message_id: str,
        active: ActiveReply,
        result: _TurnResult,
        status: str,
        error: CortexError | None,
    ) -> None:
        usage = result.usage
        fields: dict[str, Any] = {
            "content": result.text,
            "status": status,
            "finish_reason": result.finish if status == "complete" else status,
            "error_code": error.code if error is not None else None,
        }
        if result.calls:
            fields["tool_calls"] = [call.as_openai() for call in result.calls]
        if usage is not None:
            fields.update(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=usage.cost_usd,
            )
        async with self._lock(conversation_id):
            # Shielded: a shutdown that cancels the reply must not also cancel storing it.
            row = await asyncio.shield(self.store.finish_message(message_id, **fields))
            self._active.pop(conversation_id, None)
            if row is not None:
                self.hub.publish(conversation_id, message_event(row))
            self.hub.reply_finished(message_id)
        if error is not None:
            self.hub.publish(
                conversation_id,
                ErrorEvent(
                    code=error.code, message=error.message, conversation_id=conversation_id
                ).encode(),
            )

    async def _run_tools(
        self,
        conversation_id: str,
        active_id: str,
        calls: Sequence[ToolCall],
        allowed: tuple[str, ...] | None,
        trace: ReplyTrace,
    ) -> None:
        """Run every call of one turn concurrently; store and announce each result."""
        for call in calls:
            self.hub.publish(
                conversation_id,
                ToolCallEvent(
                    conversation_id=conversation_id,
                    message_id=active_id,
                    call_id=call.id,
                    name=call.name,
                    arguments=parse_arguments(call.arguments),
                ).encode(),
            )
        results = await asyncio.gather(*(self._run_tool(call, allowed, trace) for call in calls))
        for call, outcome in zip(calls, results, strict=True):
            async with self._lock(conversation_id):
                row = await self.store.add_message(
                    conversation_id=conversation_id,
                    role="tool",
                    content=outcome.content(),
                    tool_call_id=call.id,
                    status="complete" if outcome.ok else "error",
                    error_code=None if outcome.ok else "tool_error",
                )
                self.hub.publish(
                    conversation_id,
                    ToolResultEvent(
                        conversation_id=conversation_id,
                        message_id=active_id,
                        call_id=call.id,
                        ok=outcome.ok,
                        result=outcome.result if outcome.ok else None,
                        error=outcome.error,
                    ).encode(),
                )
                self.hub.publish(conversation_id, message_event(row))

    async def _run_tool(
        self, call: ToolCall, allowed: tuple[str, ...] | None, trace: ReplyTrace
    ) -> ToolResult:
        assert self.tools is not None  # a model only calls tools it was given
        started = time.monotonic()
        outcome = await self.tools.run(
            call.name, call.arguments, timeout=self.settings.tool_timeout, allowed=allowed
        )
        trace.tool_finished(call.name, outcome.ok, time.monotonic() - started)
        return outcome

    async def _tool_limit_reached(self, conversation_id: str, model: str) -> None:
        text = TOOL_LIMIT_TEXT.format(n=self.settings.max_tool_rounds)
        async with self._lock(conversation_id):
            row = await self.store.add_message(
                conversation_id=conversation_id,
                role="assistant",
                content=text,
                status="error",
                error_code="tool_error",
                finish_reason="tool_limit",
                model=model,
            )
            self.hub.publish(conversation_id, message_event(row))
        self.hub.publish(
            conversation_id,
            ErrorEvent(code="tool_error", message=text, conversation_id=conversation_id).encode(),
        )

    # ---- lifecycle ----------------------------------------------------------------------

    def busy(self) -> bool:
        return bool(self._workers)

    def in_progress(self) -> int:
        """How many conversations are generating a reply now (a metric)."""
        return len(self._current)

    async def drain(self, grace: float) -> None:
        """Refuse new messages, let replies in progress finish for up to `grace` seconds, then
        interrupt the rest: each is stored as `interrupted` with its final `message`."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace  # one grace period for the sends and the replies
        if self._sends:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_sends.wait(), grace)
        workers = list(self._workers.values())
        if not workers:
            return
        _done, still = await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
        if not still:
            return
        # Messages still waiting stay stored and acknowledged: the next process answers them.
        for pending in self._current.values():
            _interrupt(pending)
        _done, still = await asyncio.wait(still, timeout=10)
        for task in still:  # a worker stuck past that (a hung tool): stop it outright
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)


def _interrupt(pending: PendingReply) -> None:
    pending.interrupted = True
    if pending.interruptible is not None:
        pending.interruptible.cancel()


def _reply_options(
    model: str | None,
    tools: tuple[str, ...] | None,
    temperature: float | None,
    *,
    request_id: str | None,
    connection_id: int | None,
) -> dict[str, Any]:
    """What a `send` asked of its reply, kept with the message for whichever process answers
    (with the request and connection that asked, so that its log lines name them)."""
    options = {
        "model": model,
        "tools": list(tools) if tools is not None else None,
        "temperature": temperature,
        "request_id": request_id,
        "connection_id": connection_id,
    }
    return {name: value for name, value in options.items() if value is not None}


class _CatchUpBuffer:
    """Stands in for a subscribing client while its catch-up is read from the database."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def replay(self, client: Subscriber, message_id: str, have: int) -> None:
        """Hand the buffered events on, minus the reply text the catch-up already gave."""
        for frame in self.frames:
            if isinstance(frame, DeltaFrame) and frame.message_id == message_id:
                end = frame.offset + len(frame.text)
                if end <= have:
                    continue
                if frame.offset < have:
                    cut = have - frame.offset
                    frame = delta_frame(frame.conversation_id, message_id, have, frame.text[cut:])
            client.deliver(frame)


class _NoLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_exc: object) -> None:
        return None


_NO_LOCK = _NoLock()
