"""Between two model turns: run the tools the model called, store and announce each result.

Every call of a turn runs concurrently, each bounded by `CORTEX_TOOL_TIMEOUT`; a failed or
unknown tool is a result the model sees (`ok: false`), never a failed reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..fanout.hub import Hub
from ..llm.events import ToolCall, parse_arguments
from ..ops.telemetry import ReplyTrace
from ..protocol import ErrorEvent, ToolCallEvent, ToolResultEvent
from .live import Live, PendingReply
from .views import message_event

if TYPE_CHECKING:
    from ..store.repo import Store
    from ..tools.registry import ToolRegistry, ToolResult

TOOL_LIMIT_TEXT = "I stopped: the limit of {n} tool rounds for one reply was reached."


def _cancelled(name: str) -> ToolResult:
    from ..tools.registry import ToolResult

    return ToolResult(ok=False, error=f"{name}: cancelled by the user")


class ToolLoop:
    """Runs a turn's tool calls and stores their results."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        hub: Hub,
        live: Live,
        tools: ToolRegistry | None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.live = live
        self.tools = tools

    @property
    def names(self) -> Container[str]:
        """The names a `send` may list: live, since MCP servers' tools come and go."""
        return self.tools.known if self.tools is not None else frozenset()

    def specs(self, names: tuple[str, ...] | None, user: str | None = None) -> list[dict[str, Any]]:
        """The tool specs a reply offers the model (`names`: the send's choice; `user`: the
        conversation's owner, for MCP servers with a `users` list)."""
        return self.tools.specs(names, user=user) if self.tools is not None else []

    def _server(self, name: str) -> str | None:
        found = self.tools.get(name) if self.tools is not None else None
        return found.server if found is not None else None

    async def run(
        self,
        conversation_id: str,
        message_id: str,
        calls: Sequence[ToolCall],
        allowed: tuple[str, ...] | None,
        trace: ReplyTrace,
        user: str | None = None,
        pending: PendingReply | None = None,
    ) -> str:
        """Run every call of one turn concurrently; store and announce each result, each under
        the row before it. The id of the last row stored (the next turn follows it).

        A user's `cancel` (through `pending`) cancels the calls in flight, which cancels an MCP
        call at its server; each call still gets a stored result, as the next turn needs one.
        """
        for call in calls:
            self.hub.publish(
                conversation_id,
                ToolCallEvent(
                    conversation_id=conversation_id,
                    message_id=message_id,
                    call_id=call.id,
                    name=call.name,
                    arguments=parse_arguments(call.arguments),
                    server=self._server(call.name),
                ).encode(),
            )
        calls_done = asyncio.gather(*(self._run_one(call, allowed, trace, user) for call in calls))
        if pending is not None:
            pending.interruptible = calls_done
        try:
            results: list[ToolResult] = await calls_done
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if pending is None or not pending.stopped or (task is not None and task.cancelling()):
                raise  # the worker itself is being stopped
            results = [_cancelled(call.name) for call in calls]
        finally:
            if pending is not None:
                pending.interruptible = None
        tail = message_id
        for call, outcome in zip(calls, results, strict=True):
            async with self.live.lock(conversation_id):
                row = await self.store.add_message(
                    conversation_id=conversation_id,
                    parent_id=tail,
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
                        message_id=message_id,
                        call_id=call.id,
                        ok=outcome.ok,
                        result=outcome.result if outcome.ok else None,
                        error=outcome.error,
                        server=outcome.server,
                    ).encode(),
                )
                self.hub.publish(conversation_id, message_event(row))
                tail = row.id
        return tail

    async def _run_one(
        self, call: ToolCall, allowed: tuple[str, ...] | None, trace: ReplyTrace, user: str | None
    ) -> ToolResult:
        assert self.tools is not None  # a model only calls tools it was given
        started = time.monotonic()
        outcome = await self.tools.run(
            call.name,
            call.arguments,
            timeout=self.settings.tool_timeout,
            allowed=allowed,
            user=user,
        )
        trace.tool_finished(call.name, outcome.ok, time.monotonic() - started)
        return outcome

    async def limit_reached(self, conversation_id: str, model: str, parent_id: str) -> None:
        """The reply used all its tool rounds: say so in a stored message and an error."""
        text = TOOL_LIMIT_TEXT.format(n=self.settings.max_tool_rounds)
        async with self.live.lock(conversation_id):
            row = await self.store.add_message(
                conversation_id=conversation_id,
                parent_id=parent_id,
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
