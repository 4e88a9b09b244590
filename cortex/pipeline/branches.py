"""The conversation tree's operations: edit, regenerate, switch_branch, delete_branch, fork.

Each is one store transaction under the conversation's lock, then an `ack`, then one
`conversation` event with the new `active_leaf_id` for every client of the conversation. An
edit or regenerate supersedes the reply running for the old path (on whichever process runs
it, as `cancel` does) and takes the old path's waiting turns out of the queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Settings
from ..errors import BadFrame
from ..fanout.hub import Hub, Subscriber, user_topic
from ..protocol import Ack, DeleteBranch, Edit, Fork, Regenerate, SwitchBranch
from .intake import Intake, reply_options
from .live import Live
from .views import listed_event, message_event, path_event
from .workers import Workers

if TYPE_CHECKING:
    from ..store.models import Conversation
    from ..store.repo import Store

# Past any seq: a reply of a deleted branch stops, whenever it began.
EVERY_REPLY = 2**62


class Branches:
    """The tree frames, from stored change to announced active path."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        hub: Hub,
        live: Live,
        workers: Workers,
        intake: Intake,
    ) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.live = live
        self.workers = workers
        self.intake = intake  # its attachment checks, shared with `send`

    async def edit(self, owner: str, frame: Edit, client: Subscriber) -> None:
        conversation_id = frame.conversation_id
        attached = None
        if frame.attachments is not None:  # else the original's are kept
            rows = await self.intake.checked_attachments(
                owner, frame.attachments, model=None, conversation_id=conversation_id
            )
            attached = [row.id for row in rows]
        with self.workers.accepting():
            await self.hub.watch(conversation_id)
            async with self.live.lock(conversation_id):
                change = await self.store.edit_message(
                    owner=owner,
                    conversation_id=conversation_id,
                    message_id=frame.message_id,
                    content=frame.content,
                    attachment_ids=attached,
                    client_msg_id=frame.client_msg_id,
                    reply_options=reply_options(
                        None,
                        None,
                        None,
                        request_id=frame.request_id,
                        connection_id=getattr(client, "id", None),
                    ),
                )
                message = change.message
                if not change.created and (
                    message.role != "user" or message.content != frame.content
                ):
                    raise BadFrame("client_msg_id already used for another message")
                self._ack(client, conversation_id, message.id, message.seq, frame.request_id)
                if not change.created:
                    return  # an idempotent retry: acknowledged again, nothing else
                files = self.intake.files
                views = (await files.views([message.id])).get(message.id) if files else None
                self.hub.publish(conversation_id, message_event(message, attachments=views))
                self.hub.publish(conversation_id, path_event(change.conversation))
            self.workers.supersede(conversation_id, message.seq)
            self.workers.kick(conversation_id, owed_seq=message.seq)

    async def regenerate(self, owner: str, frame: Regenerate, client: Subscriber) -> None:
        conversation_id = frame.conversation_id
        if frame.model is not None and not self.settings.is_model_allowed(frame.model):
            raise BadFrame(f"model {frame.model!r} is not enabled on this server")
        with self.workers.accepting():
            await self.hub.watch(conversation_id)
            async with self.live.lock(conversation_id):
                change = await self.store.regenerate(
                    owner=owner,
                    conversation_id=conversation_id,
                    message_id=frame.message_id,
                    client_msg_id=frame.client_msg_id,
                    model=frame.model,
                    reply_options=reply_options(
                        frame.model,
                        None,
                        None,
                        request_id=frame.request_id,
                        connection_id=getattr(client, "id", None),
                    ),
                )
                row = change.message
                if not change.created and row.role != "assistant":
                    raise BadFrame("client_msg_id already used for another message")
                self._ack(client, conversation_id, row.id, row.seq, frame.request_id)
                if not change.created:
                    return
                self.hub.publish(conversation_id, message_event(row))
                self.hub.publish(conversation_id, path_event(change.conversation))
            self.workers.supersede(conversation_id, row.seq)
            self.workers.kick(conversation_id, owed_seq=row.seq)

    async def switch(self, owner: str, frame: SwitchBranch, client: Subscriber) -> None:
        conversation_id = frame.conversation_id
        async with self.live.lock(conversation_id):
            conv = await self.store.switch_branch(
                owner=owner, conversation_id=conversation_id, message_id=frame.message_id
            )
            self._ack(client, conversation_id, frame.message_id, None, frame.request_id)
            self._announce(conv, client)

    async def delete(self, owner: str, frame: DeleteBranch, client: Subscriber) -> None:
        conversation_id = frame.conversation_id
        async with self.live.lock(conversation_id):
            conv, _ids, open_rows = await self.store.delete_branch(
                owner=owner, conversation_id=conversation_id, message_id=frame.message_id
            )
            if open_rows:  # its reply writes nothing more (a row under a deleted one fails)
                self.workers.supersede(conversation_id, EVERY_REPLY)
            self._ack(client, conversation_id, frame.message_id, None, frame.request_id)
            self._announce(conv, client)

    async def fork(self, owner: str, frame: Fork, client: Subscriber) -> None:
        conv = await self.store.fork(
            owner=owner, conversation_id=frame.conversation_id, message_id=frame.message_id
        )
        await self.hub.watch(conv.id)
        self.hub.subscribe(conv.id, client)
        self._ack(client, conv.id, conv.active_leaf_id, None, frame.request_id)
        # To the user's every connection (the sender included): a new conversation listed.
        self.hub.publish(user_topic(owner), listed_event(conv))

    @staticmethod
    def _ack(
        client: Subscriber,
        conversation_id: str,
        message_id: str | None,
        seq: int | None,
        request_id: str | None,
    ) -> None:
        client.deliver(
            Ack(
                conversation_id=conversation_id,
                message_id=message_id,
                seq=seq,
                request_id=request_id,
            ).encode()
        )

    def _announce(self, conv: Conversation, client: Subscriber) -> None:
        """The new active path, to every subscriber (and to `client`, even if it is not)."""
        event = path_event(conv)
        if not self.hub.is_subscribed(conv.id, client):
            client.deliver(event)
        self.hub.publish(conv.id, event)
