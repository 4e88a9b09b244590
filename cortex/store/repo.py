"""Every query Cortex runs. SQLAlchemy's errors become `StoreError` here, at one boundary.

Each `Store` method is one transaction: a plain function of a `Session`, handed to
`Transactions`, which runs it in a thread (SQLite) or over asyncpg (PostgreSQL). The module is
past 400 lines on purpose: it is one job (the transactions), each short, and several span
conversations, messages and the reply queue at once, so splitting it by table would split them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from .attachments import link, unlink_conversation
from .models import Conversation, Message, utcnow
from .statements import (
    ContextMessage,
    StoreConflict,
    StoreError,
    add_row,
    context_of,
    find_client_msg,
    insert_row,
    new_conversation,
    next_unanswered,
    open_turn,
    take_seq,
    update_row,
)
from .timing import Observer, timed
from .transactions import Transactions

TITLE_CHARS = 80
# What `update_conversation` may change: the per-conversation settings and the title.
CONVERSATION_SETTINGS = frozenset({"title", "model", "system_prompt", "temperature"})

T = TypeVar("T")


class StoredMessage(NamedTuple):
    """A user message as `add_user_message` stored it (or found it stored, created=False)."""

    conversation: Conversation
    message: Message
    created: bool


class StartedReply(NamedTuple):
    """A reply `start_reply` opened: the user message it answers, its conversation, what the
    model sees, and the assistant row (empty, `streaming`) the reply streams into."""

    conversation: Conversation
    message: Message
    context: list[ContextMessage]
    row: Message


class Store:
    """Async repository over one engine; each call is one short transaction."""

    def __init__(self, engine: AsyncEngine, *, observe: Observer | None = None) -> None:
        self.engine = engine
        self._transactions = Transactions(engine)
        self.observe = observe  # (operation, seconds) of each call: the database latency metric

    async def close(self) -> None:
        await self._transactions.close()

    async def transact(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` as one transaction (the attachment store's queries use this)."""
        return await self._run(fn)

    async def _run(self, fn: Callable[[Session], T]) -> T:
        try:
            return await self._transactions.run(fn)
        except IntegrityError as exc:
            raise StoreConflict(f"database conflict: {type(exc).__name__}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {type(exc).__name__}") from exc

    @timed
    async def ping(self) -> bool:
        try:
            await self._run(lambda session: session.scalar(text("SELECT 1")))
        except StoreError:
            return False
        return True

    # ---- conversations ------------------------------------------------------------------

    @timed
    async def get_conversation(self, conversation_id: str, *, owner: str) -> Conversation | None:
        """The conversation if it exists and belongs to `owner`; None otherwise (no probing)."""
        conv = await self._run(lambda session: session.get(Conversation, conversation_id))
        return conv if conv is not None and conv.owner == owner else None

    @timed
    async def get_conversation_any(self, conversation_id: str) -> Conversation | None:
        """For the server's own use (replies), whoever the owner is."""
        return await self._run(lambda session: session.get(Conversation, conversation_id))

    @timed
    async def conversations(
        self, *, owner: str, before: str | None = None, limit: int = 50
    ) -> tuple[list[Conversation], bool]:
        """The owner's conversations, most recently active first."""

        def page(session: Session) -> Sequence[Conversation]:
            query = select(Conversation).where(Conversation.owner == owner)
            if before is not None:
                anchor = session.get(Conversation, before)
                if anchor is not None and anchor.owner == owner:
                    query = query.where(
                        or_(
                            Conversation.updated_at < anchor.updated_at,
                            and_(
                                Conversation.updated_at == anchor.updated_at,
                                Conversation.id < anchor.id,
                            ),
                        )
                    )
            order = (Conversation.updated_at.desc(), Conversation.id.desc())
            return session.scalars(query.order_by(*order).limit(limit + 1)).all()

        rows = await self._run(page)
        return list(rows[:limit]), len(rows) > limit

    @timed
    async def update_conversation(
        self, conversation_id: str, *, owner: str, **fields: Any
    ) -> Conversation | None:
        """Change the title or settings of the owner's conversation; None if it is not theirs.

        `updated_at` is left alone: it orders conversations by activity, and a rename is not.
        """
        unknown = set(fields) - CONVERSATION_SETTINGS
        if unknown:
            raise ValueError(f"not a conversation setting: {', '.join(sorted(unknown))}")

        def change(session: Session) -> Conversation | None:
            conv = session.get(Conversation, conversation_id)
            if conv is None or conv.owner != owner:
                return None
            for name, value in fields.items():
                setattr(conv, name, value)
            session.flush()
            return conv

        return await self._run(change)

    @timed
    async def set_title_if(
        self, conversation_id: str, *, expected: str, title: str
    ) -> Conversation | None:
        """Replace the title only if it is still `expected` (nobody renamed it meanwhile)."""

        def rename(session: Session) -> Conversation | None:
            result = session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.title == expected)
                .values(title=title)
            )
            if not getattr(result, "rowcount", 0):
                return None
            return session.get(Conversation, conversation_id, populate_existing=True)

        return await self._run(rename)

    @timed
    async def delete_conversation(self, conversation_id: str, *, owner: str) -> int | None:
        """Delete the owner's conversation with all its messages: how many messages went.

        None if the conversation does not exist or is not the owner's.
        """

        def remove(session: Session) -> int | None:
            conv = session.get(Conversation, conversation_id)
            if conv is None or conv.owner != owner:
                return None
            unlink_conversation(session, conversation_id)  # and attachments only it used
            # Messages first: the foreign key cascades too, but only where the database enforces
            # it (SQLite needs a pragma), and an explicit delete does not depend on that.
            result = session.execute(
                delete(Message).where(Message.conversation_id == conversation_id)
            )
            session.execute(delete(Conversation).where(Conversation.id == conversation_id))
            return int(getattr(result, "rowcount", 0) or 0)

        return await self._run(remove)

    # ---- messages -----------------------------------------------------------------------

    @timed
    async def add_user_message(
        self,
        *,
        owner: str,
        conversation_id: str | None,
        content: str,
        client_msg_id: str | None,
        model: str | None = None,
        system_prompt: str | None = None,
        temperature: float | None = None,
        reply_options: dict[str, Any] | None = None,
        attachment_ids: Sequence[str] = (),
    ) -> StoredMessage | None:
        """Store a user message, creating the conversation when `conversation_id` is None.

        A repeated `client_msg_id` returns the stored message with created=False (an
        idempotent retry). None: no such conversation.
        """

        def store(session: Session) -> StoredMessage | None:
            if client_msg_id is not None:
                found = find_client_msg(session, owner, conversation_id, client_msg_id)
                if found is not None:
                    return StoredMessage(found[0], found[1], False)
            if conversation_id is None:
                # A new conversation takes its seqs as it is inserted: no UPDATE needed.
                conv = new_conversation(
                    session,
                    owner=owner,
                    title=default_title(content),
                    model=model,
                    system_prompt=system_prompt,
                    temperature=temperature,
                    last_seq=1,
                )
                seq = 1
            else:
                taken = take_seq(session, conversation_id, owner=owner)
                if taken is None:
                    return None
                conv, seq = taken
            message = add_row(
                session,
                conv.id,
                seq,
                role="user",
                content=content,
                status="complete",
                client_msg_id=client_msg_id,
                reply_options=reply_options or None,
            )
            if attachment_ids:
                link(session, message.id, attachment_ids)
            return StoredMessage(conv, message, True)

        for _attempt in range(3):
            try:
                return await self._run(store)
            except StoreConflict:
                # A concurrent retry of the same client_msg_id won the insert: read it back.
                if client_msg_id is None:
                    raise
        raise StoreError("could not store the message")

    @timed
    async def add_message(self, *, conversation_id: str, role: str, **fields: Any) -> Message:
        """Store an assistant, tool or system message at the next seq."""
        return await self._run(lambda session: insert_row(session, conversation_id, role, fields))

    @timed
    async def update_message(self, message_id: str, **fields: Any) -> None:
        await self._run(lambda session: update_row(session, message_id, fields))

    @timed
    async def finish_message(self, message_id: str, **fields: Any) -> Message | None:
        """Store a reply's final state and read the row back, in one transaction."""

        def finish(session: Session) -> Message | None:
            update_row(session, message_id, fields)
            return session.get(Message, message_id, populate_existing=True)

        return await self._run(finish)

    @timed
    async def messages(
        self,
        conversation_id: str,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> tuple[list[Message], bool]:
        """A page in seq order: the oldest after `after_seq`, or the newest before `before_seq`."""
        query = select(Message).where(Message.conversation_id == conversation_id)
        if after_seq is not None:
            query = query.where(Message.seq > after_seq).order_by(Message.seq)
        else:
            if before_seq is not None:
                query = query.where(Message.seq < before_seq)
            query = query.order_by(Message.seq.desc())
        query = query.limit(limit + 1)
        rows = list(await self._run(lambda session: session.scalars(query).all()))
        more = len(rows) > limit
        page = rows[:limit]
        if after_seq is None:
            page.reverse()
        return page, more

    @timed
    async def context(self, conversation_id: str, *, upto_user_seq: int) -> list[ContextMessage]:
        """What the model sees for the reply to user message `upto_user_seq`.

        Every stored message the user has seen, without user messages queued after it and
        without replies that failed or are still streaming.
        """
        return await self._run(lambda session: context_of(session, conversation_id, upto_user_seq))

    # ---- the reply queue ------------------------------------------------------------------

    @timed
    async def next_unanswered(self, conversation_id: str) -> tuple[Conversation, Message] | None:
        """The oldest user message of the conversation still waiting for its reply, with the
        conversation (its settings shape the reply)."""
        return await self._run(lambda session: next_unanswered(session, conversation_id))

    @timed
    async def start_reply(self, conversation_id: str, *, default_model: str) -> StartedReply | None:
        """Open the reply to the oldest user message still waiting in the conversation: read
        what the model sees and store the reply's row, in one transaction. None: none waits.

        The row's model is the one the message asked for, else the conversation's, else
        `default_model`.
        """

        def start(session: Session) -> StartedReply | None:
            waiting = next_unanswered(session, conversation_id)
            if waiting is None:
                return None
            conv, message = waiting
            options = message.reply_options or {}
            model = options.get("model") or conv.model or default_model
            context, row = open_turn(session, conversation_id, message.seq, model)
            return StartedReply(conv, message, context, row)

        return await self._run(start)

    @timed
    async def open_turn(
        self, conversation_id: str, *, upto_user_seq: int, model: str
    ) -> tuple[list[ContextMessage], Message]:
        """A later turn of a reply (after tool results): its context and its row, at once."""
        return await self._run(
            lambda session: open_turn(session, conversation_id, upto_user_seq, model)
        )

    @timed
    async def mark_answered(self, conversation_id: str, seq: int) -> None:
        """The reply to user message `seq` is settled: it leaves the queue (never moves back)."""
        await self._run(
            lambda session: session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, Conversation.answered_seq < seq)
                .values(answered_seq=seq)
            )
        )

    @timed
    async def messages_changed_since(self, conversation_id: str, since: datetime) -> list[Message]:
        """Messages stored or updated since a moment, in seq order (a catch-up after an outage)."""
        query = (
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.updated_at >= since)
            .order_by(Message.seq)
        )
        return list(await self._run(lambda session: session.scalars(query).all()))

    @timed
    async def streaming_message(self, conversation_id: str) -> Message | None:
        """The reply being generated in the conversation, as last checkpointed, if any."""
        query = (
            select(Message)
            .where(Message.conversation_id == conversation_id, Message.status == "streaming")
            .order_by(Message.seq.desc())
            .limit(1)
        )
        return await self._run(lambda session: session.scalars(query).first())

    @timed
    async def settle_streaming(self, conversation_id: str) -> list[Message]:
        """Rows left `streaming` by a process that died become `interrupted` (text kept).

        Only the holder of the conversation's reply lease may call this: nobody else can be
        streaming there. The user message they answered leaves the queue, so it is not answered
        twice; messages queued after it are answered next.
        """

        def settle(session: Session) -> list[Message]:
            rows = list(
                session.scalars(
                    select(Message).where(
                        Message.conversation_id == conversation_id,
                        Message.status == "streaming",
                    )
                ).all()
            )
            if not rows:
                return []
            now = utcnow()
            for row in rows:
                row.status = "interrupted"
                row.error_code = "interrupted"
                row.finish_reason = "interrupted"
                row.updated_at = now
            answered = session.scalar(
                select(func.max(Message.seq)).where(
                    Message.conversation_id == conversation_id,
                    Message.role == "user",
                    Message.seq < max(row.seq for row in rows),
                )
            )
            if answered is not None:
                session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id, Conversation.answered_seq < answered)
                    .values(answered_seq=answered)
                )
            session.flush()
            return rows

        return await self._run(settle)

    @timed
    async def conversations_awaiting_reply(self, *, limit: int = 500) -> list[str]:
        """Conversations with queued user messages or a reply left streaming: the work a
        process picks up when its peer died (or when it restarts itself)."""
        queued = (
            select(Message.conversation_id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Message.role == "user", Message.seq > Conversation.answered_seq)
        )
        streaming = select(Message.conversation_id).where(Message.status == "streaming")
        query = queued.union(streaming).limit(limit)
        return list(await self._run(lambda session: session.scalars(query).all()))

    @timed
    async def recover_interrupted(self) -> int:
        """At start-up of a lone process: every row left `streaming` was its predecessor's."""
        query = select(Message.conversation_id).where(Message.status == "streaming").distinct()
        ids = await self._run(lambda session: session.scalars(query).all())
        count = 0
        for conversation_id in ids:
            count += len(await self.settle_streaming(conversation_id))
        return count

    @timed
    async def count_messages(self, conversation_id: str) -> int:
        query = (
            select(func.count())
            .select_from(Message)
            .where(Message.conversation_id == conversation_id)
        )
        count: int | None = await self._run(lambda session: session.scalar(query))
        return count or 0


def default_title(content: str) -> str:
    """A new conversation's title: its first message, on one line, cut to `TITLE_CHARS`."""
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


__all__: Sequence[str] = (
    "ContextMessage",
    "StartedReply",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoredMessage",
    "default_title",
)
