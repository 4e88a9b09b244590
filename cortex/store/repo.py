"""Every query Cortex runs. SQLAlchemy's errors become `StoreError` here, at one boundary.

Each `Store` method is one transaction: a plain function of a `Session`, handed to
`Transactions`, which runs it in a thread (SQLite) or over asyncpg (PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar, cast

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ..errors import Internal
from .models import Conversation, Message, new_id, utcnow
from .timing import Observer, timed
from .transactions import Transactions

TITLE_CHARS = 80
# What `update_conversation` may change: the per-conversation settings and the title.
CONVERSATION_SETTINGS = frozenset({"title", "model", "system_prompt", "temperature"})
# A reply's context keeps assistant text the user has seen; failed partial replies are left out.
_CONTEXT_STATUSES = ("complete", "cancelled", "interrupted")

T = TypeVar("T")


class ContextMessage(NamedTuple):
    """A stored message as the model sees it: only what `views.openai_messages` reads."""

    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None


class WaitingTurn(NamedTuple):
    """A reply to start: the user message it answers, its conversation, what the model sees."""

    conversation: Conversation
    message: Message
    context: list[ContextMessage]
    # Its row, if stored with the message (`open_reply`) and not streamed into yet.
    reply: Message | None = None


class StoredMessage(NamedTuple):
    """A user message as `add_user_message` stored it (or found it stored, created=False)."""

    conversation: Conversation
    message: Message
    created: bool
    reply: Message | None = None  # the reply's row, when it was opened with the message
    context: list[ContextMessage] | None = None  # what the model sees, when it was opened


class StoreError(Internal):
    """The database failed; the client gets `internal`, the details go to the log."""


class Store:
    """Async repository over one engine; each call is one short transaction."""

    def __init__(self, engine: AsyncEngine, *, observe: Observer | None = None) -> None:
        self.engine = engine
        self._transactions = Transactions(engine)
        self.observe = observe  # (operation, seconds) of each call: the database latency metric

    async def close(self) -> None:
        await self._transactions.close()

    async def _run(self, fn: Callable[[Session], T]) -> T:
        try:
            return await self._transactions.run(fn)
        except IntegrityError:
            raise
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
        open_reply: str | None = None,
    ) -> StoredMessage | None:
        """Store a user message, creating the conversation when `conversation_id` is None.

        A repeated `client_msg_id` returns the stored message with created=False (an
        idempotent retry). None: no such conversation.

        `open_reply` (the server's default model): if no older message of the conversation
        waits for its reply, this message's reply can start at once, so its row is stored too
        (`streaming`, for the message's model, else the conversation's, else this one) and
        the context is read, in the same transaction: the model is called with no other
        database work before its first words. The result's `reply` and `context` say so.
        """

        def store(session: Session) -> StoredMessage | None:
            if client_msg_id is not None:
                found = _find_client_msg(session, owner, conversation_id, client_msg_id)
                if found is not None:
                    return StoredMessage(found[0], found[1], False)
            if conversation_id is None:
                # A new conversation takes its seqs as it is inserted: no UPDATE needed.
                conv = _new_conversation(
                    session,
                    owner=owner,
                    title=_title(content),
                    model=model,
                    system_prompt=system_prompt,
                    temperature=temperature,
                    last_seq=1 if open_reply is None else 2,
                )
                seq = 1
            else:
                taken = _take_seq(session, conversation_id, owner=owner)
                if taken is None:
                    return None
                conv, seq = taken
            message = _add(
                session,
                conv.id,
                seq,
                role="user",
                content=content,
                status="complete",
                client_msg_id=client_msg_id,
                reply_options=reply_options or None,
            )
            if open_reply is None or _older_waits(session, conv, seq):
                return StoredMessage(conv, message, True)
            if conversation_id is None:
                context = [ContextMessage("user", content, None, None)]  # the message alone
                reply_seq = seq + 1
            else:
                context = _context(session, conv.id, seq)
                taken = _take_seq(session, conv.id)
                assert taken is not None  # the row was just updated in this transaction
                conv, reply_seq = taken
            reply_model = model or conv.model or open_reply
            reply = _add(session, conv.id, reply_seq, **opened_reply_fields(reply_model))
            return StoredMessage(conv, message, True, reply, context)

        for _attempt in range(3):
            try:
                return await self._run(store)
            except IntegrityError:
                # A concurrent retry of the same client_msg_id won the insert: read it back.
                if client_msg_id is None:
                    raise
        raise StoreError("could not store the message")

    @timed
    async def add_message(self, *, conversation_id: str, role: str, **fields: Any) -> Message:
        """Store an assistant, tool or system message at the next seq."""
        return await self._run(lambda session: _insert(session, conversation_id, role, fields))

    @timed
    async def update_message(self, message_id: str, **fields: Any) -> None:
        await self._run(lambda session: _update_message(session, message_id, fields))

    @timed
    async def finish_message(self, message_id: str, **fields: Any) -> Message | None:
        """Store a reply's final state and read the row back, in one transaction."""

        def finish(session: Session) -> Message | None:
            _update_message(session, message_id, fields)
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
        return await self._run(lambda session: _context(session, conversation_id, upto_user_seq))

    # ---- the reply queue ------------------------------------------------------------------

    @timed
    async def next_unanswered(self, conversation_id: str) -> tuple[Conversation, Message] | None:
        """The oldest user message of the conversation still waiting for its reply, with the
        conversation (its settings shape the reply)."""
        return await self._run(lambda session: _next_unanswered(session, conversation_id))

    @timed
    async def waiting_turn(self, conversation_id: str) -> WaitingTurn | None:
        """The oldest user message still waiting for its reply, its conversation, and what the
        model sees to answer it: everything the model call needs, in one read."""

        def read(session: Session) -> WaitingTurn | None:
            waiting = _next_unanswered(session, conversation_id)
            if waiting is None:
                return None
            conv, message = waiting
            context = _context(session, conversation_id, message.seq)
            return WaitingTurn(conv, message, context, _opened_reply(session, conv, message))

        return await self._run(read)

    def opening_turn(self, stored: StoredMessage) -> WaitingTurn:
        """The turn a message opened when it was stored with its reply's row (`open_reply`),
        as `waiting_turn` would read it."""
        assert stored.reply is not None and stored.context is not None
        return WaitingTurn(stored.conversation, stored.message, stored.context, stored.reply)

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


# ---- queries used by several transactions ------------------------------------------------


# The statements of a reply's way through the store, built once: building a SQLAlchemy
# statement and its cache key costs more than running it on SQLite (a new conversation's
# first message took 3.8 ms of a thread when each call built its own; see docs/performance.md).
_conversations = cast(Table, Conversation.__table__)
_messages = cast(Table, Message.__table__)
_MESSAGE_DEFAULTS: dict[str, Any] = {column.key: None for column in _messages.columns} | {
    "content": "",
    "status": "complete",
}
_INSERT_CONVERSATION = insert(_conversations)
_INSERT_MESSAGE = insert(_messages)
_TAKE_SEQ = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("target"))
    .values(last_seq=_conversations.c.last_seq + 1, updated_at=bindparam("now"))
    .returning(*_conversations.columns)
)
# (A bind parameter of an UPDATE may not share a column's name: that name is the SET value.)
_TAKE_SEQ_OWNED = _TAKE_SEQ.where(_conversations.c.owner == bindparam("owner_"))
_UPDATE_MESSAGE = update(_messages).where(_messages.c.id == bindparam("message_id"))
# Ids only: a send is almost never a retry, and a miss should cost no ORM loading.
_FIND_CLIENT_MSG = (
    select(_messages.c.conversation_id, _messages.c.id)
    .join(_conversations, _messages.c.conversation_id == _conversations.c.id)
    .where(
        _conversations.c.owner == bindparam("owner"),
        _messages.c.client_msg_id == bindparam("cmid"),
    )
    .limit(1)
)
_FIND_CLIENT_MSG_IN = _FIND_CLIENT_MSG.where(_conversations.c.id == bindparam("target"))
_CONTEXT = (
    select(Message.role, Message.content, Message.tool_calls, Message.tool_call_id)
    .where(
        Message.conversation_id == bindparam("target"),
        # A failed tool result still answers its call: the model needs to see it.
        or_(Message.status.in_(_CONTEXT_STATUSES), Message.role == "tool"),
        or_(Message.role != "user", Message.seq <= bindparam("upto")),
    )
    .order_by(Message.seq)
)
_WAITING_BEFORE = (
    select(_messages.c.seq)
    .where(
        _messages.c.conversation_id == bindparam("target"),
        _messages.c.role == "user",
        _messages.c.seq > bindparam("answered"),
        _messages.c.seq < bindparam("seq"),
    )
    .limit(1)
)
_OPENED_REPLY = select(Message).where(
    Message.conversation_id == bindparam("target"),
    Message.seq == bindparam("next"),
    Message.role == "assistant",
    Message.status == "streaming",
)
_NEXT_UNANSWERED = (
    select(Conversation, Message)
    .join(Conversation, Conversation.id == Message.conversation_id)
    .where(
        Message.conversation_id == bindparam("target"),
        Message.role == "user",
        Message.seq > Conversation.answered_seq,
    )
    .order_by(Message.seq)
    .limit(1)
)


def _core(session: Session) -> Connection:
    """The session's connection: Core statements run on it skip the ORM's execution layer
    (half a millisecond of a new conversation's first message; see docs/performance.md)."""
    return session.connection()


def _new_conversation(session: Session, **fields: Any) -> Conversation:
    now = utcnow()
    values = fields | {"id": new_id(), "created_at": now, "updated_at": now, "answered_seq": 0}
    _core(session).execute(_INSERT_CONVERSATION, values)
    return Conversation(**values)


def opened_reply_fields(model: str) -> dict[str, Any]:
    """An assistant row as a reply opens it: empty, streaming, for `model`."""
    return {"role": "assistant", "content": "", "status": "streaming", "model": model}


def _find_client_msg(
    session: Session, owner: str, conversation_id: str | None, client_msg_id: str
) -> tuple[Conversation, Message] | None:
    params = {"owner": owner, "cmid": client_msg_id}
    if conversation_id is not None:
        params["target"] = conversation_id
    query = _FIND_CLIENT_MSG if conversation_id is None else _FIND_CLIENT_MSG_IN
    found = _core(session).execute(query, params).first()
    if found is None:
        return None
    conv, message = session.get(Conversation, found[0]), session.get(Message, found[1])
    assert conv is not None and message is not None  # read in this transaction
    return conv, message


def _insert(session: Session, conversation_id: str, role: str, fields: dict[str, Any]) -> Message:
    taken = _take_seq(session, conversation_id)
    if taken is None:
        raise StoreError("no such conversation")
    return _add(session, conversation_id, taken[1], role=role, **fields)


def _take_seq(
    session: Session, conversation_id: str, *, owner: str | None = None
) -> tuple[Conversation, int] | None:
    """The conversation (as updated) and the next seq in it; None if it is not there (or not
    `owner`'s). One statement: the write comes first, so it holds the row's lock."""
    # Taking the next seq with UPDATE ... RETURNING locks the conversation row, so seq stays
    # gap-free and unique under concurrent writers (SQLite and PostgreSQL alike).
    params = {"target": conversation_id, "now": utcnow()}
    if owner is None:
        row = _core(session).execute(_TAKE_SEQ, params).first()
    else:
        row = _core(session).execute(_TAKE_SEQ_OWNED, params | {"owner_": owner}).first()
    if row is None:
        return None
    conv = Conversation(**row._mapping)  # detached, as every row a Store call hands out
    return conv, conv.last_seq


def _add(session: Session, conversation_id: str, seq: int, **fields: Any) -> Message:
    now = utcnow()
    values = _MESSAGE_DEFAULTS | fields
    values.update(
        id=new_id(), conversation_id=conversation_id, seq=seq, created_at=now, updated_at=now
    )
    # Unset columns are left out, so they are SQL NULL (None would be JSON `null` in a JSON one).
    _core(session).execute(
        _INSERT_MESSAGE, {key: value for key, value in values.items() if value is not None}
    )
    return Message(**values)


def _update_message(session: Session, message_id: str, fields: dict[str, Any]) -> None:
    _core(session).execute(
        _UPDATE_MESSAGE, {"message_id": message_id, "updated_at": utcnow(), **fields}
    )


def _context(session: Session, conversation_id: str, upto_user_seq: int) -> list[ContextMessage]:
    # Plain rows, not ORM objects: this read is on every reply's way to the model, and a long
    # conversation's rows cost two to three times as much to load as ORM objects.
    rows = _core(session).execute(_CONTEXT, {"target": conversation_id, "upto": upto_user_seq})
    return [ContextMessage(*row) for row in rows]


def _older_waits(session: Session, conv: Conversation, seq: int) -> bool:
    """Whether a user message before `seq` still waits for its reply."""
    if conv.answered_seq >= seq - 1:
        return False
    params = {"target": conv.id, "answered": conv.answered_seq, "seq": seq}
    return _core(session).execute(_WAITING_BEFORE, params).first() is not None


def _opened_reply(session: Session, conv: Conversation, message: Message) -> Message | None:
    """The row opened with a waiting message (`open_reply`), if nobody has streamed into it:
    a worker that the sweep started before `send` went on answers into that row."""
    if conv.last_seq <= message.seq:
        return None  # nothing stored after the message (every reply of a multi-process server)
    params = {"target": message.conversation_id, "next": message.seq + 1}
    return session.scalars(_OPENED_REPLY, params).first()


def _next_unanswered(session: Session, conversation_id: str) -> tuple[Conversation, Message] | None:
    row = session.execute(_NEXT_UNANSWERED, {"target": conversation_id}).first()
    return (row[0], row[1]) if row is not None else None


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


__all__: Sequence[str] = (
    "ContextMessage",
    "Store",
    "StoreError",
    "StoredMessage",
    "WaitingTurn",
)
