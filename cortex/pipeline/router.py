"""The pipeline's front: one user message in, one stored, streamed (and tool-using) reply out.

It knows nothing of sockets or SQL: it gets a `Store`, an LLM backend, a hub and (optionally) a
tool registry and Redis leases, and talks to clients only through `Subscriber.deliver` and
`Hub.publish`. The work is done in its rooms (docs/architecture.md):

    intake    a `send`: checked, stored, acknowledged, announced, queued
    workers   one worker per conversation: leases, the sweep, cancel, drain
    reply     one reply: plan, model turns streamed into rows, finish
    tool_loop the tools between two turns
    reads     subscribe and catch-up, resync, history, conversations
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from ..config import Settings
from ..fanout.hub import Hub, Subscriber
from ..llm.events import LlmBackend
from ..ops.telemetry import Telemetry
from ..protocol import Send
from .branches import Branches
from .files import Files
from .intake import Intake
from .live import Live
from .reads import Reader, Reads
from .reply import Replies
from .tool_loop import ToolLoop
from .workers import Workers

if TYPE_CHECKING:
    from ..fanout.leases import RedisLeases
    from ..store.repo import Store
    from ..tools.registry import ToolRegistry


class Router:
    """The pipeline, assembled from its rooms; `server` and `app` use only this."""

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
        telemetry = telemetry if telemetry is not None else Telemetry(settings)
        self.leases = leases
        live = Live()
        self.files = Files(settings=settings, store=store)  # attachments
        tool_loop = ToolLoop(settings=settings, store=store, hub=hub, live=live, tools=tools)
        replies = Replies(
            files=self.files,
            settings=settings,
            store=store,
            hub=hub,
            llm=llm,
            live=live,
            tool_loop=tool_loop,
            telemetry=telemetry,
        )
        self.workers = Workers(
            store=store,
            hub=hub,
            live=live,
            replies=replies,
            default_model=llm.default_model,
            leases=leases,
        )
        self.intake = Intake(
            settings=settings,
            store=store,
            hub=hub,
            live=live,
            workers=self.workers,
            files=self.files,
            tool_names=tool_loop.names,
            telemetry=telemetry,
        )
        self.reads = Reads(
            settings=settings, store=store, hub=hub, live=live, leases=leases, files=self.files
        )
        self.branches = Branches(
            settings=settings,
            store=store,
            hub=hub,
            live=live,
            workers=self.workers,
            intake=self.intake,
        )

    async def send(self, owner: str, frame: Send, client: Subscriber) -> None:
        await self.intake.send(owner, frame, client)

    async def subscribe(
        self,
        owner: str,
        conversation_id: str,
        after_seq: int | None,
        client: Reader,
        request_id: str | None = None,
    ) -> None:
        await self.reads.subscribe(owner, conversation_id, after_seq, client, request_id)

    async def cancel(self, owner: str, conversation_id: str) -> bool:
        """Stop the reply in progress (or the next one, if it has not started): its text so far
        is stored as `cancelled`. The process generating it may be another one."""
        await self.reads.conversation(owner, conversation_id)
        return self.workers.cancel(conversation_id)

    async def abandon(self, conversation_id: str) -> None:
        await self.workers.abandon(conversation_id)

    async def resync(self, conversation_id: str, since: datetime) -> None:
        await self.reads.resync(conversation_id, since)

    async def sweep(self) -> None:
        await self.workers.sweep()
        await self.files.sweep()  # uploads no message took, past CORTEX_ATTACHMENT_TTL_S

    async def drain(self, grace: float) -> None:
        await self.workers.drain(grace)

    @property
    def closing(self) -> bool:
        return self.workers.closing

    def in_progress(self) -> int:
        return self.workers.in_progress()
