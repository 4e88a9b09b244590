"""A `send` in: checked, stored, acknowledged, announced, and handed to the conversation's worker.

The message is acknowledged only once it is committed; its reply is the workers' business.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..errors import BadFrame, NotFound
from ..fanout.hub import Hub, Subscriber, user_topic
from ..llm.vision import takes_images
from ..ops.telemetry import Telemetry
from ..protocol import Ack, Send
from .files import Files, attachment_view
from .live import Live
from .views import listed_event, message_event
from .workers import Workers

if TYPE_CHECKING:
    from ..store.models import Attachment
    from ..store.repo import Store


class Intake:
    """Stores user messages and queues their replies."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        hub: Hub,
        live: Live,
        workers: Workers,
        tool_names: Container[str],
        telemetry: Telemetry,
        files: Files | None = None,
    ) -> None:
        self.files = files
        self.settings = settings
        self.store = store
        self.hub = hub
        self.live = live
        self.workers = workers
        self.tool_names = tool_names
        self.telemetry = telemetry

    async def send(self, owner: str, frame: Send, client: Subscriber) -> None:
        """Store a user message, ack it, announce it, and queue its reply."""
        if frame.parent_id is not None and frame.conversation_id is None:
            raise BadFrame("parent_id names a message of conversation_id, which is missing")
        model = frame.model
        if model is not None and not self.settings.is_model_allowed(model):
            raise BadFrame(f"model {model!r} is not enabled on this server")
        tools = tuple(frame.tools) if frame.tools is not None else None
        unknown = [name for name in tools or () if name not in self.tool_names]
        if unknown:
            raise BadFrame(f"unknown tools: {', '.join(unknown)}")
        attached = await self.checked_attachments(
            owner, frame.attachments, model=model, conversation_id=frame.conversation_id
        )
        with self.workers.accepting():  # Unavailable once the server is shutting down
            await self._store(owner, frame, client, model, tools, attached)

    async def checked_attachments(
        self,
        owner: str,
        ids: Sequence[str] | None,
        *,
        model: str | None,
        conversation_id: str | None,
    ) -> list[Attachment]:
        """The attachments a `send` or an `edit` names: the owner's, and images only for a
        model that takes them (checked before anything is stored)."""
        if not ids:
            return []
        if self.files is None:
            raise BadFrame("this server takes no attachments")
        rows = await self.files.for_send(owner, ids)
        if any(row.kind == "image" for row in rows):
            if model is None and conversation_id is not None:
                conv = await self.store.get_conversation(conversation_id, owner=owner)
                if conv is None:
                    raise NotFound("no such conversation")
                model = conv.model
            model = model or self.settings.model()
            if not takes_images(model, self.settings.vision_models):
                raise BadFrame(
                    f"model {model!r} does not take images: pick a vision model, or add it to "
                    "CORTEX_VISION_MODELS if it takes them"
                )
        return rows

    async def _store(
        self,
        owner: str,
        frame: Send,
        client: Subscriber,
        model: str | None,
        tools: tuple[str, ...] | None,
        attached: list[Attachment],
    ) -> None:
        connection_id = getattr(client, "id", None)
        lock: contextlib.AbstractAsyncContextManager[Any]
        if frame.conversation_id:
            # Replies to earlier messages may come from another process: listen first.
            await self.hub.watch(frame.conversation_id)
            lock = self.live.lock(frame.conversation_id)
        elif frame.client_msg_id:
            # Two connections retrying one new-conversation send must not create two.
            lock = self.live.lock(f"new:{owner}:{frame.client_msg_id}")
        else:
            lock = contextlib.nullcontext()
        # Its reply's model request may start while the message commits (`early`): the worker
        # takes it with the kick, else it is cancelled.
        early = self.workers.early_for_send()
        try:
            async with lock:
                stored = await self.store.add_user_message(
                    owner=owner,
                    conversation_id=frame.conversation_id,
                    content=frame.content,
                    client_msg_id=frame.client_msg_id,
                    model=model,
                    system_prompt=frame.system_prompt,
                    temperature=frame.temperature,
                    parent_id=frame.parent_id,
                    reply_options=reply_options(
                        model,
                        tools,
                        frame.temperature,
                        request_id=frame.request_id,
                        connection_id=connection_id,
                    ),
                    attachment_ids=[row.id for row in attached],
                    on_context=early.on_context if early is not None else None,
                )
                if stored is None:
                    raise NotFound("no such conversation")
                conv, message = stored.conversation, stored.message
                if not stored.created and (
                    message.role != "user" or message.content != frame.content
                ):
                    # An idempotency key names one message: reusing it for another is a mistake
                    # the client must hear about, not a silent drop of the new text.
                    raise BadFrame("client_msg_id already used for another message")
                self.hub.subscribe(conv.id, client)
                client.deliver(
                    Ack(
                        conversation_id=conv.id,
                        message_id=message.id,
                        seq=message.seq,
                        request_id=frame.request_id,
                    ).encode()
                )
                if not stored.created:
                    return  # an idempotent retry: acknowledged again, nothing else
                views = [attachment_view(row) for row in attached]
                self.hub.publish(conv.id, message_event(message, attachments=views))
            if frame.conversation_id is None:
                await self.hub.watch(conv.id)
                # Other tabs' sidebars (the sender has its ack).
                self.hub.publish_except(user_topic(owner), listed_event(conv), client)
            self.telemetry.message_stored(
                user=owner,
                conversation_id=conv.id,
                seq=message.seq,
                content=frame.content,
                created=frame.conversation_id is None,
                request_id=frame.request_id,
                connection_id=connection_id,
            )
            # Accepted before any shutdown began: its reply is seen through even if one has
            # since.
            self.workers.kick(conv.id, owed_seq=message.seq, early=early)
            early = None  # the worker has it
        finally:
            if early is not None:
                early.cancel()


def reply_options(
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
