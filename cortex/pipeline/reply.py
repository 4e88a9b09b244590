"""One reply: its plan, its model turns (streamed, checkpointed, stored), tools between them.

A turn streams into a row the workers (or the tool loop) stored with the turn's context, in one
transaction; the first turn's request usually began while that committed (`early`), its events
held until the row exists. Deltas go to the hub at their exact character offsets, and the text
is checkpointed beside the stream, so a slow database write never becomes a gap in the reply.
Just over 400 lines: a turn's stream, its storing and the tool rounds share one set of state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import CortexError, Internal, TooLarge
from ..fanout.hub import Hub
from ..llm.events import (
    Finish,
    LlmBackend,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCalls,
    UsageInfo,
)
from ..ops.telemetry import ReplyTrace, Telemetry
from ..protocol import ErrorEvent, Typing
from .checkpoints import Checkpoints
from .early import EarlyTurn, Opened, Opening, TurnRequest
from .files import Files
from .live import ActiveReply, Live, PendingReply
from .tool_loop import ToolLoop
from .views import message_event, openai_messages

if TYPE_CHECKING:
    from ..store.models import Conversation, Message
    from ..store.repo import ContextMessage, StartedReply, Store

log = logging.getLogger("cortex.router")

# How long one reply may read chunks that are already buffered before the other tasks get the
# loop. Longer: fewer, larger frames; shorter: a loaded process starts new replies sooner.
STREAM_SLICE_S = 0.01
# ...and with many replies at once, slices short enough that all of them together hold the loop
# for at most this long: every reply gets a turn (and every socket a read) within about a second,
# well inside a stall timeout (bench/soak.py).
STREAM_ROUND_S = 1.0
# A chunk that took longer than this to come was waited for (the loop ran meanwhile), not read
# from a burst already buffered.
STREAM_WAITED_S = 0.001


@dataclass(slots=True)
class Plan:
    """How one reply is generated: settled once, when it starts."""

    model: str
    system_prompt: str
    temperature: float | None
    specs: list[dict[str, Any]]
    trace: ReplyTrace


@dataclass(slots=True)
class TurnResult:
    message_id: str
    text: str = ""
    calls: tuple[ToolCall, ...] = ()
    usage: UsageInfo | None = None
    finish: str | None = None


class Replies:
    """Generates replies: model turns into stored rows, with the tool loop between them."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        hub: Hub,
        llm: LlmBackend,
        live: Live,
        tool_loop: ToolLoop,
        telemetry: Telemetry,
        files: Files | None = None,
    ) -> None:
        self.files = files  # attachments: the model gets their parts
        self.settings = settings
        self.store = store
        self.hub = hub
        self.llm = llm
        self.live = live
        self.tool_loop = tool_loop
        self.telemetry = telemetry
        self.checkpoints = Checkpoints(store)  # every reply's checkpoints, batched

    def plan(self, conv: Conversation, pending: PendingReply) -> Plan:
        model = pending.model or conv.model or self.llm.default_model()
        temperature = pending.temperature
        return Plan(
            model=model,
            system_prompt=conv.system_prompt or self.settings.system_prompt,
            temperature=temperature if temperature is not None else conv.temperature,
            specs=self.tool_loop.specs(pending.tools, user=conv.owner),
            trace=self.telemetry.reply(
                conversation_id=conv.id,
                model=model,
                user_seq=pending.seq,
                request_id=pending.request_id,
                connection_id=pending.connection_id,
            ),
        )

    def early(self) -> EarlyTurn:
        """A reply's first turn, ready to start from inside `start_reply` (see `early`)."""
        return EarlyTurn(self._start_early)

    def _start_early(
        self, opening: Opening
    ) -> tuple[TurnRequest, asyncio.Future[Opened], asyncio.Future[None]] | None:
        """The first turn's stream from what `start_reply` read, by the rules of `plan` (the
        turn compares the requests, so a rule that differs costs a restart, never a wrong reply).
        A context with attachments waits for the turn: their parts need the store."""
        if any(row.has_files for row in opening.context):
            return None
        options = opening.options
        model = options.get("model") or opening.model or self.llm.default_model()
        temperature = options.get("temperature")
        tools = options.get("tools")
        specs = self.tool_loop.specs(
            tuple(tools) if tools is not None else None, user=opening.owner
        )
        request = TurnRequest(
            messages=self._trim(openai_messages(opening.context), model),
            model=model,
            system_prompt=opening.system_prompt or self.settings.system_prompt,
            temperature=temperature if temperature is not None else opening.temperature,
            tools=specs or None,
            context=opening.context,
        )
        gate: asyncio.Future[Opened] = asyncio.get_running_loop().create_future()
        return (
            request,
            gate,
            asyncio.ensure_future(self._stream(opening.conversation_id, request, gate)),
        )

    async def answer(
        self, started: StartedReply, pending: PendingReply, early: EarlyTurn | None = None
    ) -> None:
        """See a started reply through: its turns, the tools between them, typing off.
        `early`: its first turn's stream, if begun while the reply's row committed."""
        conversation_id = started.conversation.id
        plan = self.plan(started.conversation, pending)
        if early is not None and early.started_at is not None:
            plan.trace.started = early.started_at  # the time to the first token runs from it
        try:
            context, row = started.context, started.row
            rounds = 0
            while True:
                result = await self._turn(conversation_id, pending, plan, context, row, early)
                early = None  # later turns follow their tools
                if not result.calls or pending.stopped:
                    return
                rounds += 1
                tail = await self.tool_loop.run(
                    conversation_id,
                    result.message_id,
                    result.calls,
                    pending.tools,
                    plan.trace,
                    user=started.conversation.owner,
                    pending=pending,
                )
                if pending.stopped:  # cancelled during the tools: no further turn
                    return
                if rounds >= self.settings.max_tool_rounds:
                    await self.tool_loop.limit_reached(conversation_id, plan.model, tail)
                    plan.trace.failed("tool_error")
                    return
                async with self.live.lock(conversation_id):
                    context, row = await self.store.open_turn(
                        conversation_id, parent_id=tail, model=plan.model
                    )
                    self.hub.publish(conversation_id, message_event(row))
        finally:
            if early is not None:
                early.cancel()  # the reply stopped before its first turn took the stream
            self.hub.publish(
                conversation_id, Typing(conversation_id=conversation_id, active=False).encode()
            )
            plan.trace.end()

    async def _turn(
        self,
        conversation_id: str,
        pending: PendingReply,
        plan: Plan,
        context: list[ContextMessage],
        row: Message,
        early: EarlyTurn | None = None,
    ) -> TurnResult:
        """One model turn into one assistant row: streamed, checkpointed, then finalised."""
        active = ActiveReply(message_id=row.id, seq=row.seq)
        self.live.active[conversation_id] = active
        result = TurnResult(message_id=row.id)
        status, error = "complete", None
        try:
            if pending.stopped:
                raise asyncio.CancelledError  # stopped before it started: nothing to stream
            messages = early.messages_for(context, plan.model) if early is not None else None
            if messages is None:
                messages = self._trim(await self._model_messages(context), plan.model)
            request = TurnRequest(
                messages, plan.model, plan.system_prompt, plan.temperature, plan.specs or None
            )
            taken = early.take(request) if early is not None else None
            if taken is not None:
                stream, gate = taken  # begun while the row committed: its events may flow now
            else:
                gate = asyncio.get_running_loop().create_future()
                stream = asyncio.ensure_future(self._stream(conversation_id, request, gate))
            gate.set_result(Opened(active, result, plan.trace))
            pending.interruptible = stream
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
            if not pending.stopped:
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
            await self._finish_row(conversation_id, active, result, status, error)
        return result

    async def _model_messages(self, context: list[ContextMessage]) -> list[dict[str, Any]]:
        """The context in OpenAI's format, user messages with attachments as content parts
        (images come scaled from `Files.for_model`; their base64, megabytes, is made in a
        thread rather than on the loop)."""
        ids = [row.id for row in context if row.has_files and row.id is not None]
        found = await self.files.for_model(ids) if self.files is not None and ids else {}
        if not found:
            return openai_messages(context)
        return await asyncio.to_thread(openai_messages, context, found)

    def _trim(self, messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        trim = getattr(self.llm, "trim", None)
        return trim(messages, model) if trim is not None else messages

    async def _stream(
        self, conversation_id: str, request: TurnRequest, gate: asyncio.Future[Opened]
    ) -> None:
        """Read the model's stream; its events are handled once `gate` says where they go (the
        row committed and the turn adopted this stream)."""
        events = self.llm.stream(
            request.messages,
            model=request.model,
            system_prompt=request.system_prompt,
            temperature=request.temperature,
            tools=request.tools,
        )
        try:
            await self._relay(conversation_id, events, gate)
        finally:
            # Cancelled at the gate, the stream waits at a yield: close its HTTP request now.
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    async def _relay(
        self,
        conversation_id: str,
        events: AsyncIterator[StreamEvent],
        gate: asyncio.Future[Opened],
    ) -> None:
        interval = self.settings.checkpoint_ms / 1000
        next_checkpoint = 0.0
        next_yield = time.monotonic() + STREAM_SLICE_S
        read_at = 0.0  # when the previous chunk was handled
        publish = self.hub.publish_delta
        limit = self.settings.max_reply_chars
        opened: Opened | None = None
        async for event in events:
            if opened is None:
                opened = await gate
                active, result, trace = opened
                next_checkpoint = time.monotonic() + interval
            if isinstance(event, TextDelta):
                text = event.text
                if active.length + len(text) > limit:
                    # Stored and sent up to the limit, then the reply ends as `too_large`.
                    await self._cut_at_limit(conversation_id, active, text, limit)
                if not active.length:
                    trace.first_token()
                publish(conversation_id, active.message_id, active.length, text)
                active.parts.append(text)
                active.length += len(text)
                now = time.monotonic()
                if now - read_at > STREAM_WAITED_S:
                    # This chunk was waited for: the loop ran the others meanwhile, and a
                    # new slice of reading starts.
                    next_yield = now + STREAM_SLICE_S
                read_at = now
                if now >= next_checkpoint and (
                    active.checkpoint is None or active.checkpoint.done()
                ):
                    # Checkpoints bound what a crash can lose. They run beside the stream (one
                    # at a time), so a slow database write never becomes a gap in the reply.
                    active.checkpoint = self.checkpoints.request(active)
                    next_checkpoint = now + interval
                if now >= next_yield:
                    # Chunks that arrive in a burst are read without the loop running anything
                    # else: give the others a turn after each slice of reading (timed from
                    # when the turn comes back, so a busy loop still joins a burst into few
                    # frames).
                    await asyncio.sleep(0)
                    replies = len(self.live.active) or 1
                    read_at = time.monotonic()
                    next_yield = read_at + min(STREAM_SLICE_S, STREAM_ROUND_S / replies)
            elif isinstance(event, ToolCalls):
                result.calls = event.calls
            elif isinstance(event, UsageInfo):
                result.usage = event
            elif isinstance(event, Finish):
                result.finish = event.reason

    async def _cut_at_limit(
        self, conversation_id: str, active: ActiveReply, text: str, limit: int
    ) -> None:
        room = text[: limit - active.length]
        if room:
            self.hub.publish_delta(conversation_id, active.message_id, active.length, room)
            active.parts.append(room)
            active.length += len(room)
        raise TooLarge(
            f"the reply reached {limit} characters (CORTEX_MAX_REPLY_CHARS) and was stopped"
        )

    async def _finish_row(
        self,
        conversation_id: str,
        active: ActiveReply,
        result: TurnResult,
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
        async with self.live.lock(conversation_id):
            # Shielded: a shutdown that cancels the reply must not also cancel storing it.
            row = await asyncio.shield(self.store.finish_message(active.message_id, **fields))
            self.live.active.pop(conversation_id, None)
            if row is not None:
                self.hub.publish(conversation_id, message_event(row))
            self.hub.reply_finished(active.message_id)
        if error is not None:
            self.hub.publish(
                conversation_id,
                ErrorEvent(
                    code=error.code, message=error.message, conversation_id=conversation_id
                ).encode(),
            )
