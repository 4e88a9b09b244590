"""What clients read: subscribe with catch-up, resync after an outage, history, conversations.

The WebSocket and the HTTP API read through here alike, so both show a streaming reply's live
text (not its last checkpoint). A conversation that is not the caller's is `not_found`, exactly
like one that does not exist.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import orjson

from ..config import Settings
from ..errors import NotFound
from ..fanout.hub import USER_TOPIC, Hub, Subscriber
from ..protocol import (
    Ack,
    AttachmentView,
    ConversationsPage,
    ConversationView,
    DeltaFrame,
    HistoryPage,
    MessageView,
    Search,
    SearchHit,
    SearchResults,
    Typing,
    delta_frame,
)
from ..search.service import run_search
from .files import Files
from .live import Live
from .views import conversation_view, message_event, message_view, search_hit

if TYPE_CHECKING:
    from ..fanout.leases import RedisLeases
    from ..store.models import Conversation, Message
    from ..store.repo import Store

CATCH_UP_PAGE = 200
EXPORT_PAGE = 500


class Reader(Subscriber, Protocol):
    """A client that catches up: it says when its backlog leaves room for more, and takes a
    reply's text so far once, dropping the deltas it already holds however late they come."""

    async def room(self) -> None: ...

    def trim_below(self, message_id: str, offset: int) -> None: ...


class Reads:
    """Every read a client makes, with the live state of replies streaming in this process."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        hub: Hub,
        live: Live,
        leases: RedisLeases | None = None,
        files: Files | None = None,
    ) -> None:
        self.files = files  # attachments, shown with their messages
        self.settings = settings
        self.store = store
        self.hub = hub
        self.live = live
        self.leases = leases

    async def conversation(self, owner: str, conversation_id: str) -> Conversation:
        conv = await self.store.get_conversation(conversation_id, owner=owner)
        if conv is None:
            raise NotFound("no such conversation")
        return conv

    async def subscribe(
        self,
        owner: str,
        conversation_id: str,
        after_seq: int | None,
        client: Reader,
        request_id: str | None = None,
    ) -> None:
        """Catch up from `after_seq`, then the reply in progress so far, then live events.

        Events published while the catch-up reads the database wait in a buffer and follow
        it, so nothing falls between the two, whichever process publishes them.
        """
        await self.conversation(owner, conversation_id)
        buffer = CatchUpBuffer()
        self.hub.subscribe(conversation_id, buffer)  # before anything is read
        # A client a `send` already subscribed takes its live events through the buffer too
        # until the catch-up is out: otherwise they could overtake the catch-up's text.
        was_subscribed = self.hub.is_subscribed(conversation_id, client)
        self.hub.unsubscribe(conversation_id, client)
        streamed: list[str] = []  # rows the catch-up shows as streaming
        # Replies the catch-up shows whole (id -> length): the buffer may hold their earlier
        # states (the streaming row, deltas), which must not follow.
        settled: dict[str, int] = {}
        try:
            await self.hub.watch(conversation_id)
            if after_seq is not None:
                # The active path (and user messages waiting for their turn), not the other
                # branches: a client draws what the model sees.
                owed = await self.store.catch_up(conversation_id, after_seq=after_seq)
                for start in range(0, len(owed), CATCH_UP_PAGE):
                    rows, siblings = await self.store.messages_by_ids(
                        conversation_id, owed[start : start + CATCH_UP_PAGE]
                    )
                    files = await self.attachments_of(rows)
                    for row in rows:
                        streaming = row.status == "streaming"
                        if streaming:
                            streamed.append(row.id)
                        elif row.role == "assistant":
                            settled[row.id] = len(row.content)
                        await client.room()  # long messages go out as the client reads them
                        client.deliver(
                            message_event(
                                row,
                                content="" if streaming else None,
                                sibling_ids=siblings.get(row.parent_id),
                                attachments=files.get(row.id),
                            )
                        )
            if await self.replying(conversation_id):
                client.deliver(Typing(conversation_id=conversation_id, active=True).encode())
            self.hub.flush(conversation_id)  # joined deltas not yet out land in the buffer
            message_id, text = await self._text_so_far(conversation_id)
            # (A reply the catch-up showed whole may still be live here for a moment, its
            # final write done: its text is not handed again.)
            texts = {message_id: text} if text and message_id not in settled else {}
            ended = [id_ for id_ in streamed if id_ != message_id]
            if ended:
                # Shown as streaming, but the reply ended since it was read: its text so far is
                # its whole text (its final `message` waits in the buffer).
                rows, _ = await self.store.messages_by_ids(conversation_id, ended)
                texts |= {row.id: row.content for row in rows if row.status != "streaming"}
            for id_, so_far in texts.items():
                if so_far:
                    client.trim_below(id_, 0)  # a floor left by an earlier subscribe is stale
                    client.deliver(delta_frame(conversation_id, id_, 0, so_far))
        except BaseException:
            self.hub.unsubscribe(conversation_id, buffer)
            if was_subscribed:
                self.hub.subscribe(conversation_id, client)
            raise
        # From here on no await: the buffer hands over to the client in one step.
        self.hub.unsubscribe(conversation_id, buffer)
        self.hub.subscribe(conversation_id, client)
        if settled:
            # The newest may have deltas still to come live (joined ones flush before its
            # final `message` is published): below its length they are dropped.
            newest = next(reversed(settled))
            client.trim_below(newest, settled[newest])
        # The text so far may come from Redis ahead of its deltas' PUBLISH (another process
        # makes the reply): the client drops what it has, buffered now or arriving later.
        for id_, so_far in texts.items():
            client.trim_below(id_, len(so_far))
        buffer.replay(client, settled)
        # The ack closes the catch-up: everything after it is live.
        client.deliver(Ack(conversation_id=conversation_id, request_id=request_id).encode())

    async def resync(self, conversation_id: str, since: datetime) -> None:
        """Events of the conversation may have been lost since `since` (Redis was away): hand
        this process's subscribers every message that changed meanwhile, and the typing state.
        A reply still streaming goes on at offsets past what they have: they resubscribe."""
        if conversation_id.startswith(USER_TOPIC):
            return  # a user's topic, not a conversation: it has no stored messages
        deliver = self.hub.deliver_local
        rows = await self.store.messages_changed_since(conversation_id, since)
        files = await self.attachments_of(rows)
        for row in rows:
            deliver(conversation_id, message_event(row, attachments=files.get(row.id)))
        active = await self.replying(conversation_id)
        deliver(conversation_id, Typing(conversation_id=conversation_id, active=active).encode())

    async def replying(self, conversation_id: str) -> bool:
        if conversation_id in self.live.current:  # maybe in a tool, with nothing streaming
            return True
        return self.leases is not None and await self.leases.held(conversation_id)

    async def _text_so_far(self, conversation_id: str) -> tuple[str, str]:
        """(message id, text) of the reply in progress: here, or from the process making it."""
        active = self.live.active.get(conversation_id)
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

    def view(
        self,
        row: Message,
        sibling_ids: list[str] | None = None,
        attachments: list[AttachmentView] | None = None,
    ) -> MessageView:
        """A stored message as clients see it, with the live text if it is streaming here."""
        return message_view(
            row,
            content=self.live.text_of(row.conversation_id, row.id),
            sibling_ids=sibling_ids,
            attachments=attachments,
        )

    async def attachments_of(self, rows: list[Message]) -> dict[str, list[AttachmentView]]:
        """The attachments of the user messages among `rows`, by message id."""
        ids = [row.id for row in rows if row.role == "user"]
        if self.files is None or not ids:
            return {}
        return await self.files.views(ids)

    async def history(
        self,
        owner: str,
        conversation_id: str,
        *,
        before_seq: int | None,
        limit: int,
        leaf_id: str | None = None,
        around_seq: int | None = None,
    ) -> tuple[list[MessageView], bool]:
        """A page of the active path (or of the path to `leaf_id`), root first: the newest
        messages before `before_seq` on it; and whether older ones precede them.

        With `around_seq` (opening a search hit deep in a conversation) the page is centred on
        that message instead: half the page before it, it and the rest after, on the path that
        runs through it (down its branch as last active, unless `leaf_id` names the path).
        """
        await self.conversation(owner, conversation_id)
        page = await self.store.path_page(
            conversation_id,
            leaf_id=leaf_id,
            before_seq=before_seq,
            around_seq=around_seq,
            limit=min(limit, self.settings.history_page_max),
        )
        if page is None:
            raise NotFound("no such message in this conversation")
        files = await self.attachments_of(page.rows)
        return [
            self.view(r, page.siblings.get(r.parent_id), files.get(r.id)) for r in page.rows
        ], page.more

    async def history_frame(
        self,
        owner: str,
        conversation_id: str,
        *,
        before_seq: int | None,
        limit: int,
        request_id: str | None = None,
        leaf_id: str | None = None,
        around_seq: int | None = None,
    ) -> str:
        views, more = await self.history(
            owner,
            conversation_id,
            before_seq=before_seq,
            limit=limit,
            leaf_id=leaf_id,
            around_seq=around_seq,
        )
        return HistoryPage.model_construct(
            conversation_id=conversation_id, messages=views, has_more=more, request_id=request_id
        ).encode()

    # ---- search (docs/search.md) ----

    async def search(
        self, owner: str, *, query: str, limit: int, **options: str | None
    ) -> tuple[list[SearchHit], str | None]:
        """A page of the owner's search hits and the next page's cursor; `options` are the
        cursor and the filters (conversation_id, role, after, before), as the client sent them."""
        hits, next_cursor = await run_search(
            self.store,
            owner=owner,
            query=query,
            limit=min(limit, self.settings.history_page_max),
            **options,
        )
        return [search_hit(h) for h in hits], next_cursor

    async def search_frame(self, owner: str, frame: Search) -> str:
        items, next_cursor = await self.search(
            owner,
            query=frame.query,
            limit=frame.limit,
            cursor=frame.cursor,
            conversation_id=frame.conversation_id,
            role=frame.role,
            after=frame.after,
            before=frame.before,
        )
        return SearchResults.model_construct(
            items=items, next_cursor=next_cursor, request_id=frame.request_id
        ).encode()

    async def conversations(
        self, owner: str, *, before: str | None, limit: int
    ) -> tuple[list[ConversationView], bool]:
        rows, more = await self.store.conversations(owner=owner, before=before, limit=limit)
        return [conversation_view(r) for r in rows], more

    async def conversations_frame(
        self, owner: str, *, before: str | None, limit: int, request_id: str | None = None
    ) -> str:
        items, more = await self.conversations(owner, before=before, limit=limit)
        return ConversationsPage.model_construct(
            items=items, has_more=more, request_id=request_id
        ).encode()

    async def whole_conversation(
        self, owner: str, conversation_id: str
    ) -> tuple[Conversation, list[Message]]:
        """The conversation and all its messages in seq order (an export)."""
        conv = await self.conversation(owner, conversation_id)
        rows: list[Message] = []
        while True:
            page, more = await self.store.messages(
                conversation_id, after_seq=rows[-1].seq if rows else 0, limit=EXPORT_PAGE
            )
            rows.extend(page)
            if not more or not page:
                return conv, rows


class CatchUpBuffer:
    """Stands in for a subscribing client while its catch-up is read from the database."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def replay(self, client: Subscriber, settled: Collection[str] = ()) -> None:
        """Hand the buffered events on, in order, but for the earlier states of the replies
        in `settled`, which the catch-up has shown whole: their deltas, and their row while
        it streamed (a client would reopen the finished reply)."""
        for frame in self.frames:
            if settled and _earlier_state(frame, settled):
                continue
            client.deliver(frame)


def _earlier_state(frame: str, settled: Collection[str]) -> bool:
    if isinstance(frame, DeltaFrame):
        return frame.message_id in settled
    event = orjson.loads(frame)  # a frame from another process is plain text
    kind = event.get("type")
    if kind == "delta":
        return event.get("message_id") in settled
    message = event.get("message") if kind == "message" else None
    return message is not None and message["id"] in settled and message["status"] == "streaming"
