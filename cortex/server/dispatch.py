"""Frame class -> handler: the one table that says what the server does with each client frame.

A new frame type is its class in `protocol` plus one `@table.on(TheFrame)` handler here. A
table that misses a registered frame type refuses to be built, so nothing is forgotten.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ..fanout.hub import Hub, user_topic
from ..pipeline.manage import ConversationManager
from ..pipeline.router import Router
from ..protocol import (
    INBOUND_FRAMES,
    Ack,
    Cancel,
    CancelUpload,
    Configure,
    Conversations,
    Delete,
    DeleteBranch,
    Edit,
    Fork,
    History,
    Inbound,
    Ping,
    Pong,
    Regenerate,
    Rename,
    Search,
    Send,
    Subscribe,
    SwitchBranch,
    Unsubscribe,
    Upload,
)
from .uploads import UploadSlot


class Client(Protocol):
    """The connection a frame came from, as handlers see it."""

    id: int
    owner: str
    uploads: UploadSlot

    def deliver(self, frame: str) -> None: ...

    async def room(self) -> None: ...

    def trim_below(self, message_id: str, offset: int) -> None: ...


F = TypeVar("F", bound=Inbound)
Handler = Callable[[Any, Client], Awaitable[None]]


class DispatchTable:
    """Handlers by frame class."""

    def __init__(self) -> None:
        self._handlers: dict[type[Inbound], Handler] = {}

    def on(
        self, frame_type: type[F]
    ) -> Callable[[Callable[[F, Client], Awaitable[None]]], Callable[[F, Client], Awaitable[None]]]:
        def register(
            handler: Callable[[F, Client], Awaitable[None]],
        ) -> Callable[[F, Client], Awaitable[None]]:
            self._handlers[frame_type] = handler
            return handler

        return register

    def missing(self) -> list[str]:
        """Registered frame types with no handler."""
        return sorted(kind for kind, cls in INBOUND_FRAMES.items() if cls not in self._handlers)

    async def __call__(self, frame: Inbound, client: Client) -> None:
        await self._handlers[type(frame)](frame, client)


def frame_handlers(router: Router, manager: ConversationManager, hub: Hub) -> DispatchTable:
    """What each client frame does."""
    table = DispatchTable()

    @table.on(Send)
    async def send(frame: Send, client: Client) -> None:
        await router.send(client.owner, frame, client)

    @table.on(Subscribe)
    async def subscribe(frame: Subscribe, client: Client) -> None:
        await router.subscribe(
            client.owner, frame.conversation_id, frame.after_seq, client, frame.request_id
        )

    @table.on(Unsubscribe)
    async def unsubscribe(frame: Unsubscribe, client: Client) -> None:
        hub.unsubscribe(frame.conversation_id, client)
        client.deliver(
            Ack(conversation_id=frame.conversation_id, request_id=frame.request_id).encode()
        )

    @table.on(History)
    async def history(frame: History, client: Client) -> None:
        page = await router.reads.history_frame(
            client.owner,
            frame.conversation_id,
            before_seq=frame.before_seq,
            limit=frame.limit,
            request_id=frame.request_id,
            leaf_id=frame.leaf_id,
            around_seq=frame.around_seq,
        )
        client.deliver(page)

    @table.on(Conversations)
    async def conversations(frame: Conversations, client: Client) -> None:
        # A client that lists the conversations hears of later changes to the list (new,
        # forked, renamed, deleted) from the owner's other connections. One that never asks
        # (a script) is spared them: with many connections of one user, each new
        # conversation would cost a frame on every one of them.
        topic = user_topic(client.owner)
        if not hub.is_subscribed(topic, client):
            hub.subscribe(topic, client)
            await hub.watch(topic)
        page = await router.reads.conversations_frame(
            client.owner, before=frame.before, limit=frame.limit, request_id=frame.request_id
        )
        client.deliver(page)

    @table.on(Cancel)
    async def cancel(frame: Cancel, client: Client) -> None:
        await router.cancel(client.owner, frame.conversation_id)
        client.deliver(
            Ack(conversation_id=frame.conversation_id, request_id=frame.request_id).encode()
        )

    @table.on(Ping)
    async def ping(frame: Ping, client: Client) -> None:
        client.deliver(Pong(request_id=frame.request_id).encode())

    @table.on(Rename)
    async def rename(frame: Rename, client: Client) -> None:
        await manager.rename(client.owner, frame, client)

    @table.on(Delete)
    async def delete(frame: Delete, client: Client) -> None:
        await manager.delete(client.owner, frame, client)

    @table.on(Configure)
    async def configure(frame: Configure, client: Client) -> None:
        await manager.configure(client.owner, frame, client)

    # ---- the conversation tree (pipeline/branches) ----

    @table.on(Edit)
    async def edit(frame: Edit, client: Client) -> None:
        await router.branches.edit(client.owner, frame, client)

    @table.on(Regenerate)
    async def regenerate(frame: Regenerate, client: Client) -> None:
        await router.branches.regenerate(client.owner, frame, client)

    @table.on(SwitchBranch)
    async def switch_branch(frame: SwitchBranch, client: Client) -> None:
        await router.branches.switch(client.owner, frame, client)

    @table.on(DeleteBranch)
    async def delete_branch(frame: DeleteBranch, client: Client) -> None:
        await router.branches.delete(client.owner, frame, client)

    @table.on(Fork)
    async def fork(frame: Fork, client: Client) -> None:
        await router.branches.fork(client.owner, frame, client)

    @table.on(Search)
    async def search(frame: Search, client: Client) -> None:
        client.deliver(await router.reads.search_frame(client.owner, frame))

    # ---- attachments (docs/attachments.md) ----

    @table.on(Upload)
    async def upload(frame: Upload, client: Client) -> None:
        await client.uploads.begin(frame)  # answered by `attachment` once its bytes are in

    @table.on(CancelUpload)
    async def cancel_upload(frame: CancelUpload, client: Client) -> None:
        await client.uploads.cancel(frame)

    missing = table.missing()
    if missing:
        raise RuntimeError(f"client frames with no handler: {', '.join(missing)}")
    return table
