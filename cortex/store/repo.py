"""Every query Cortex runs. SQLAlchemy's errors become `StoreError` here, at one boundary.

Each `Store` method is one transaction: a plain function of a `Session`, handed to
`Transactions`, which runs it in a thread (SQLite) or over asyncpg (PostgreSQL). The module is
past 400 lines on purpose: it is one job (the transactions), each short, and several span
conversations, messages, the tree and the reply queue at once (an edit stores a message, moves
the active path and cancels waiting turns in one), so splitting it by table would split them.
The statements they share live in `statements`, `tree` and `attachments`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from ..errors import BadFrame, NotFound
from .attachments import link, linked, unlink, unlink_conversation
from .models import Conversation, Message, new_id, utcnow
from .statements import (
    ContextMessage,
    StoreConflict,
    StoreError,
    add_row,
    checkpoint_rows,
    find_client_msg,
    finish_row,
    insert_row,
    mark_answered,
    new_conversation,
    next_unanswered,
    take_seq,
    update_row,
)
from .timing import Observer, timed
from .transactions import Transactions
from .tree import (
    OPEN_STATUSES,
    busy,
    descend,
    extend,
    insert_child,
    make_active,
    open_turn,
    path,
    path_context,
    path_ids,
    siblings,
    skip_waiting,
    subtree_ids,
)

TITLE_CHARS = 80
# What `update_conversation` may change: the per-conversation settings and the title.
CONVERSATION_SETTINGS = frozenset({"title", "model", "system_prompt", "temperature"})

T = TypeVar("T")


# Told inside `start_reply`'s transaction what the reply's model sees: the conversation, the
# user message, the options of a regeneration's queued row (else None) and the context.
ContextHook = Callable[
    [Conversation, Message, "dict[str, Any] | None", "list[ContextMessage]"], None
]


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
    # The user message, if its parent was fixed now (it was queued): announced again.
    placed: Message | None = None
    # The active path moved to this reply's branch (a send that named its parent).
    moved: bool = False


class BranchChange(NamedTuple):
    """What an edit or regenerate stored, and the old path's waiting turns it cancelled."""

    conversation: Conversation
    message: Message
    created: bool
    cancelled: list[str]


class Page(NamedTuple):
    """A page of a path (root first), whether older messages precede it, and the siblings of
    each message (its own id included) by parent."""

    rows: list[Message]
    more: bool
    siblings: dict[str | None, list[str]]


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

    async def run(self, fn: Callable[[Session], T]) -> T:
        """One transaction of statements a room brings itself (search), with the same boundary
        from SQLAlchemy's errors to `StoreError`."""
        return await self._run(fn)

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
        parent_id: str | None = None,
        attachment_ids: Sequence[str] = (),
        on_context: ContextHook | None = None,
    ) -> StoredMessage | None:
        """Store a user message, creating the conversation when `conversation_id` is None.

        It follows `parent_id` if given (a branch if that message has children already), else
        the active leaf. A repeated `client_msg_id` returns the stored message with
        created=False (an idempotent retry). None: no such conversation. `on_context`: told
        what its reply's model would see, inside the transaction, when nothing waits before
        it (see `start_reply`).
        """

        def store(session: Session) -> StoredMessage | None:
            if client_msg_id is not None:
                found = find_client_msg(session, owner, conversation_id, client_msg_id)
                if found is not None:
                    return StoredMessage(found[0], found[1], False)
            if conversation_id is None:
                # A new conversation takes its seqs as it is inserted: no UPDATE needed.
                message_id = new_id()
                conv = new_conversation(
                    session,
                    owner=owner,
                    title=default_title(content),
                    model=model,
                    system_prompt=system_prompt,
                    temperature=temperature,
                    last_seq=1,
                    active_leaf_id=message_id,
                )
                message = add_row(
                    session,
                    conv.id,
                    1,
                    id=message_id,
                    role="user",
                    content=content,
                    status="complete",
                    client_msg_id=client_msg_id,
                    reply_options=reply_options or None,
                )
                if attachment_ids:
                    link(session, message.id, attachment_ids)
                elif on_context is not None:
                    context = [ContextMessage("user", content, None, None, message.id)]
                    on_context(conv, message, None, context)
                return StoredMessage(conv, message, True)
            taken = take_seq(session, conversation_id, owner=owner)
            if taken is None:
                return None
            conv, seq = taken
            if parent_id is not None and not _in_conversation(session, conv.id, parent_id):
                raise NotFound("no such message in this conversation")
            options = dict(reply_options or {})
            # Queued behind a reply: the parent is fixed when its turn comes (the end of the
            # path then); until then it sits under the leaf it was sent at.
            queued = busy(session, conv.id, conv.answered_seq)
            if queued and parent_id is None:
                options["parent_pending"] = True
            leaf = conv.active_leaf_id
            message = add_row(
                session,
                conv.id,
                seq,
                role="user",
                content=content,
                status="complete",
                client_msg_id=client_msg_id,
                reply_options=options or None,
                parent_id=parent_id if parent_id is not None else leaf,
            )
            if not queued:
                if message.parent_id == leaf:
                    extend(session, conv.id, leaf, message.id)
                else:
                    make_active(session, conv.id, message.id)
                conv.active_leaf_id = message.id
            if attachment_ids:
                link(session, message.id, attachment_ids)
            elif on_context is not None and not queued:
                on_context(conv, message, None, path_context(session, conv.id, message.id))
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
    async def add_message(
        self, *, conversation_id: str, role: str, parent_id: str | None = None, **fields: Any
    ) -> Message:
        """Store an assistant, tool or system message at the next seq (a reply's row under the
        row before it, `parent_id`)."""
        if parent_id is None:
            return await self._run(
                lambda session: insert_row(session, conversation_id, role, fields)
            )
        return await self._run(
            lambda session: insert_child(session, conversation_id, parent_id, role, fields)
        )

    @timed
    async def update_message(self, message_id: str, **fields: Any) -> None:
        await self._run(lambda session: update_row(session, message_id, fields))

    @timed
    async def checkpoint_texts(self, texts: list[tuple[str, str]]) -> None:
        """The text so far of several streaming replies, in one transaction."""
        if texts:
            await self._run(lambda session: checkpoint_rows(session, texts))

    @timed
    async def finish_message(self, message_id: str, **fields: Any) -> Message | None:
        """Store a reply's final state and read the row back, in one statement."""
        return await self._run(lambda session: finish_row(session, message_id, fields))

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
    async def context(self, conversation_id: str, *, upto_id: str) -> list[ContextMessage]:
        """What the model sees for a reply that follows message `upto_id`: the path from the
        root to it, without replies that failed or are still streaming."""
        return await self._run(lambda session: path_context(session, conversation_id, upto_id))

    # ---- the reply queue ------------------------------------------------------------------

    @timed
    async def next_unanswered(self, conversation_id: str) -> tuple[Conversation, Message] | None:
        """The oldest user message of the conversation still waiting for its reply, with the
        conversation (its settings shape the reply)."""
        return await self._run(lambda session: next_unanswered(session, conversation_id))

    @timed
    async def start_reply(
        self,
        conversation_id: str,
        *,
        default_model: str,
        answered_seq: int | None = None,
        on_context: ContextHook | None = None,
    ) -> StartedReply | None:
        """Open the reply to the oldest user message still waiting in the conversation: read
        what the model sees and store the reply's row, in one transaction. None: none waits.

        The row's model is the one the message asked for, else the conversation's, else
        `default_model`. `answered_seq`: the previous reply is settled, as `mark_answered`
        would say, in the same transaction (one round trip less a reply).
        `on_context(conversation, message, row_options, context)` is called inside the
        transaction (on its thread) once the context is read, before the row is written and
        committed: the reply may start its model request meanwhile.
        """

        def start(session: Session) -> StartedReply | None:
            if answered_seq is not None:
                mark_answered(session, conversation_id, answered_seq)
            waiting = next_unanswered(session, conversation_id)
            if waiting is None:
                return None
            conv, work = waiting
            if work.role == "assistant":  # a regeneration: it streams into its queued row
                message = session.get(Message, work.parent_id) if work.parent_id else None
                if message is None:
                    update_row(session, work.id, {"status": "cancelled"})
                    raise StoreError("a regeneration lost its user message")
                context = path_context(session, conversation_id, message.id)
                if on_context is not None:
                    on_context(conv, message, work.reply_options, context)
                # Its model: the frame's, else the one the message asked for, else the usual.
                asked = (message.reply_options or {}).get("model")
                work.model = work.model or asked or conv.model or default_model
                update_row(session, work.id, {"status": "streaming", "model": work.model})
                work.status = "streaming"
                return StartedReply(conv, message, context, work)
            return _start_turn(session, conv, work, default_model, on_context)

        return await self._run(start)

    @timed
    async def open_turn(
        self, conversation_id: str, *, parent_id: str, model: str
    ) -> tuple[list[ContextMessage], Message]:
        """A later turn of a reply (after tool results): its context and its row, at once."""
        return await self._run(
            lambda session: open_turn(session, conversation_id, parent_id, model)
        )

    @timed
    async def mark_answered(self, conversation_id: str, seq: int) -> None:
        """The reply to user message `seq` is settled: it leaves the queue (never moves back)."""
        await self._run(lambda session: mark_answered(session, conversation_id, seq))

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
        streaming = select(Message.conversation_id).where(Message.status.in_(OPEN_STATUSES))
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

    # ---- the tree ---------------------------------------------------------------------

    @timed
    async def active_path_ids(self, *conversation_ids: str) -> set[str]:
        """The ids on these conversations' active paths, in one read (for `on_active_path`)."""

        def read(session: Session) -> set[str]:
            ids: set[str] = set()
            for conversation_id in dict.fromkeys(conversation_ids):
                conv = session.get(Conversation, conversation_id)
                leaf = conv.active_leaf_id if conv is not None else None
                ids.update(path_ids(session, conversation_id, leaf))
            return ids

        return await self._run(read)

    @timed
    async def path_page(
        self,
        conversation_id: str,
        *,
        leaf_id: str | None = None,
        before_seq: int | None = None,
        around_seq: int | None = None,
        limit: int = 50,
    ) -> Page | None:
        """The newest `limit` messages of the path from the root to `leaf_id` (the active leaf
        if None) that come before the message `before_seq` on it. None: no such leaf here.

        With `around_seq`, the page centred on that message (half the page before it) on the
        path through it: down its branch as last active, unless `leaf_id` names the path."""

        def read(session: Session) -> Page | None:
            leaf = leaf_id
            if around_seq is not None and leaf is None:
                hit = session.execute(
                    select(Message.id).where(
                        Message.conversation_id == conversation_id, Message.seq == around_seq
                    )
                ).scalar()
                if hit is None:
                    return None
                leaf = descend(session, conversation_id, hit)
            if leaf is None:
                conv = session.get(Conversation, conversation_id)
                leaf = conv.active_leaf_id if conv is not None else None
                if leaf is None:
                    return Page([], False, {})
            steps = path(session, conversation_id, leaf)
            if not steps:
                return None
            end = len(steps)
            if around_seq is not None:
                at = next((n for n, step in enumerate(steps) if step.seq == around_seq), None)
                if at is None:
                    return None
                start = max(0, at - limit // 2)
                end = min(len(steps), start + limit)
                start = max(0, min(start, end - limit))
                rows = _load(session, [step.id for step in steps[start:end]])
                return Page(rows, start > 0, siblings(session, conversation_id, _parents(rows)))
            if before_seq is not None:
                end = next((n for n, step in enumerate(steps) if step.seq >= before_seq), end)
            start = max(0, end - limit)
            rows = _load(session, [step.id for step in steps[start:end]])
            return Page(rows, start > 0, siblings(session, conversation_id, _parents(rows)))

        return await self._run(read)

    @timed
    async def catch_up(self, conversation_id: str, *, after_seq: int) -> list[str]:
        """Ids after `after_seq`, in seq order, that a reconnecting client is owed: those on
        the active path, and user messages still waiting for their turn."""

        def read(session: Session) -> list[str]:
            conv = session.get(Conversation, conversation_id)
            if conv is None:
                return []
            steps = path(session, conversation_id, conv.active_leaf_id)
            owed = {step.id: step.seq for step in steps if step.seq > after_seq}
            waiting = session.execute(
                select(Message.id, Message.seq).where(
                    Message.conversation_id == conversation_id,
                    Message.role == "user",
                    Message.seq > max(after_seq, conv.answered_seq),
                )
            )
            owed.update({row[0]: row[1] for row in waiting})
            return sorted(owed, key=owed.__getitem__)

        return await self._run(read)

    @timed
    async def messages_by_ids(
        self, conversation_id: str, ids: Sequence[str]
    ) -> tuple[list[Message], dict[str | None, list[str]]]:
        """These messages in the given order, and the siblings of each by parent."""

        def read(session: Session) -> tuple[list[Message], dict[str | None, list[str]]]:
            rows = _load(session, ids)
            return rows, siblings(session, conversation_id, _parents(rows))

        return await self._run(read)

    @timed
    async def edit_message(
        self,
        *,
        owner: str,
        conversation_id: str,
        message_id: str,
        content: str,
        client_msg_id: str | None,
        reply_options: dict[str, Any],
        attachment_ids: Sequence[str] | None = None,
    ) -> BranchChange:
        """Store a new user message beside `message_id` (same parent), make it the active leaf,
        and take the old path's waiting turns out of the queue. It keeps the original's
        attachments unless `attachment_ids` says otherwise."""

        def store(session: Session) -> BranchChange:
            conv, original = _target(session, owner, conversation_id, message_id)
            if client_msg_id is not None:
                found = find_client_msg(session, owner, conversation_id, client_msg_id)
                if found is not None:
                    return BranchChange(found[0], found[1], False, [])
            if original.role != "user":
                raise BadFrame("only a user message can be edited; regenerate a reply")
            options = {
                key: value
                for key, value in (original.reply_options or {}).items()
                if key in ("model", "tools", "temperature")
            } | reply_options
            taken = take_seq(session, conv.id)
            assert taken is not None  # read in this transaction
            cancelled = skip_waiting(session, conv.id, taken[1] - 1)
            message = add_row(
                session,
                conv.id,
                taken[1],
                role="user",
                content=content,
                status="complete",
                client_msg_id=client_msg_id,
                reply_options=options or None,
                parent_id=original.parent_id,
            )
            files = linked(session, original.id) if attachment_ids is None else attachment_ids
            if files:
                link(session, message.id, files)
            make_active(session, conv.id, message.id)
            return BranchChange(_fresh(session, conv.id), message, True, cancelled)

        return await self._run_once(store, client_msg_id)

    @timed
    async def regenerate(
        self,
        *,
        owner: str,
        conversation_id: str,
        message_id: str,
        client_msg_id: str | None,
        model: str | None,
        reply_options: dict[str, Any],
    ) -> BranchChange:
        """Store a `queued` reply beside `message_id`: a child of the user message the reply
        answered (a reply that used tools is rerun whole). It becomes the active leaf."""

        def store(session: Session) -> BranchChange:
            conv, target = _target(session, owner, conversation_id, message_id)
            if client_msg_id is not None:
                found = find_client_msg(session, owner, conversation_id, client_msg_id)
                if found is not None:
                    return BranchChange(found[0], found[1], False, [])
            if target.role != "assistant":
                raise BadFrame("only an assistant message can be regenerated; edit it instead")
            question: Message | None = target
            while question is not None and question.role != "user":
                question = session.get(Message, question.parent_id) if question.parent_id else None
            if question is None:
                raise BadFrame("this reply answers no user message")
            taken = take_seq(session, conv.id)
            assert taken is not None  # read in this transaction
            cancelled = skip_waiting(session, conv.id, taken[1] - 1)
            row = add_row(
                session,
                conv.id,
                taken[1],
                role="assistant",
                content="",
                status="queued",
                model=model,
                client_msg_id=client_msg_id,
                reply_options=reply_options or None,
                parent_id=question.id,
            )
            make_active(session, conv.id, row.id)
            return BranchChange(_fresh(session, conv.id), row, True, cancelled)

        return await self._run_once(store, client_msg_id)

    async def _run_once(self, fn: Callable[[Session], T], client_msg_id: str | None) -> T:
        for _attempt in range(3):
            try:
                return await self._run(fn)
            except StoreConflict:
                if client_msg_id is None:  # a concurrent retry won: the next try reads it
                    raise
        raise StoreError("could not store the message")

    @timed
    async def switch_branch(
        self, *, owner: str, conversation_id: str, message_id: str
    ) -> Conversation:
        """Make the active path run through `message_id`, down the branch as it was last
        active beneath it."""

        def switch(session: Session) -> Conversation:
            conv, _message = _target(session, owner, conversation_id, message_id)
            leaf = descend(session, conv.id, message_id)
            make_active(session, conv.id, leaf)
            return _fresh(session, conv.id)

        return await self._run(switch)

    @timed
    async def delete_branch(
        self, *, owner: str, conversation_id: str, message_id: str
    ) -> tuple[Conversation, list[str], bool]:
        """Delete `message_id` and everything beneath it; the active path moves to the newest
        sibling left, or to the parent. The conversation, the ids deleted, and whether a reply
        that was running or waiting among them must be stopped."""

        def remove(session: Session) -> tuple[Conversation, list[str], bool]:
            conv, message = _target(session, owner, conversation_id, message_id)
            ids = subtree_ids(session, conv.id, message_id)
            open_rows = session.scalar(
                select(func.count())
                .select_from(Message)
                .where(Message.id.in_(ids), Message.status.in_(OPEN_STATUSES))
            )
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                unlink(session, chunk)  # files only this branch used go with it
                session.execute(delete(Message).where(Message.id.in_(chunk)))
            parent = message.parent_id
            left = siblings(session, conv.id, [parent])[parent]
            if parent is not None:
                holder = session.get(Message, parent)
                if holder is not None and holder.active_child_id in ids:
                    update_row(session, parent, {"active_child_id": left[-1] if left else None})
            if conv.active_leaf_id in ids:
                leaf = descend(session, conv.id, left[-1]) if left else parent
                make_active(session, conv.id, leaf)
            return _fresh(session, conv.id), ids, bool(open_rows)

        return await self._run(remove)

    @timed
    async def fork(self, *, owner: str, conversation_id: str, message_id: str) -> Conversation:
        """A new conversation (same owner and settings) holding a copy of the path from the
        root to `message_id`; everything in it counts as answered."""

        def copy(session: Session) -> Conversation:
            conv, _message = _target(session, owner, conversation_id, message_id)
            rows = _load(session, path_ids(session, conv.id, message_id))
            ids = [new_id() for _row in rows]
            fork = new_conversation(
                session,
                owner=owner,
                title=conv.title,
                model=conv.model,
                system_prompt=conv.system_prompt,
                temperature=conv.temperature,
                last_seq=len(rows),
                active_leaf_id=ids[-1],
            )
            session.execute(
                update(Conversation)
                .where(Conversation.id == fork.id)
                .values(answered_seq=len(rows))
            )
            for seq, (row, new, parent) in enumerate(
                zip(rows, ids, [None, *ids[:-1]], strict=True), start=1
            ):
                status = {"streaming": "interrupted", "queued": "cancelled"}.get(
                    row.status, row.status
                )
                add_row(
                    session,
                    fork.id,
                    seq,
                    id=new,
                    parent_id=parent,
                    active_child_id=ids[seq] if seq < len(ids) else None,
                    **{name: getattr(row, name) for name in _COPIED},
                    status=status,
                )
                files = linked(session, row.id)  # shared, not copied
                if files:
                    link(session, new, files)
            return _fresh(session, fork.id)

        return await self._run(copy)

    @timed
    async def count_messages(self, conversation_id: str) -> int:
        query = (
            select(func.count())
            .select_from(Message)
            .where(Message.conversation_id == conversation_id)
        )
        count: int | None = await self._run(lambda session: session.scalar(query))
        return count or 0


_COPIED = (
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "finish_reason",
    "error_code",
    "reply_options",
)


def _target(
    session: Session, owner: str, conversation_id: str, message_id: str
) -> tuple[Conversation, Message]:
    """The owner's conversation and a message of it; `not_found` for anything else."""
    conv = session.get(Conversation, conversation_id)
    if conv is None or conv.owner != owner:
        raise NotFound("no such conversation")
    message = session.get(Message, message_id)
    if message is None or message.conversation_id != conversation_id:
        raise NotFound("no such message in this conversation")
    return conv, message


def _in_conversation(session: Session, conversation_id: str, message_id: str) -> bool:
    message = session.get(Message, message_id)
    return message is not None and message.conversation_id == conversation_id


def _fresh(session: Session, conversation_id: str) -> Conversation:
    session.flush()
    conv = session.get(Conversation, conversation_id, populate_existing=True)
    assert conv is not None  # written in this transaction
    return conv


def _load(session: Session, ids: Sequence[str]) -> list[Message]:
    """These messages, in the order of `ids` (in chunks: a bound list has its limits)."""
    found: dict[str, Message] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found.update(
            (row.id, row) for row in session.scalars(select(Message).where(Message.id.in_(chunk)))
        )
    return [found[message_id] for message_id in ids if message_id in found]


def _parents(rows: Sequence[Message]) -> set[str | None]:
    return {row.parent_id for row in rows}


def _start_turn(
    session: Session,
    conv: Conversation,
    message: Message,
    default_model: str,
    on_context: ContextHook | None = None,
) -> StartedReply:
    """The turn of a waiting user message: its parent is fixed if it was queued (the end of
    the active path now), the path runs through it, and its reply's row is stored."""
    placed: Message | None = None
    moved = False
    options = dict(message.reply_options or {})
    leaf = conv.active_leaf_id
    if options.pop("parent_pending", False):
        if message.parent_id != leaf:
            placed = message
        message.parent_id = leaf
        message.reply_options = options or None
        update_row(session, message.id, {"parent_id": leaf, "reply_options": options or None})
    if leaf != message.id:
        if leaf == message.parent_id:
            extend(session, conv.id, leaf, message.id)
        else:
            make_active(session, conv.id, message.id)
            moved = True
    model = options.get("model") or conv.model or default_model
    heard = None if on_context is None else partial(on_context, conv, message, None)
    context, row = open_turn(session, conv.id, message.id, model, heard)
    return StartedReply(conv, message, context, row, placed, moved)


def default_title(content: str) -> str:
    """A new conversation's title: its first message, on one line, cut to `TITLE_CHARS`."""
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


__all__: Sequence[str] = (
    "ContextHook",
    "ContextMessage",
    "BranchChange",
    "Page",
    "StartedReply",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoredMessage",
    "default_title",
)
