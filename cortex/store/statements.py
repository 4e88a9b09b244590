"""The statements of a reply's way through the store, and the functions of a `Session` that
several transactions share. Core statements built once: building a SQLAlchemy statement and its
cache key costs more than running it on SQLite (a new conversation's first message took 3.8 ms
of a thread when each call built its own; bench/NOTEBOOK.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from ..errors import Internal
from .models import Conversation, Message, new_id, utcnow


class StoreError(Internal):
    """The database failed; the client gets `internal`, the details go to the log."""


class StoreConflict(StoreError):
    """A write lost a race on a unique key (two retries of one `client_msg_id`)."""


class ContextMessage(NamedTuple):
    """A stored message as the model sees it: only what `views.openai_messages` reads."""

    role: str
    content: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    id: str | None = None  # the row's id: its attachments are found by it
    has_files: bool = False  # it carries attachments


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
# The work a conversation has waiting, with the conversation, in one row of both tables' columns.
_WAITING = select(_conversations, _messages).join(
    _conversations, _conversations.c.id == _messages.c.conversation_id
)
_NEXT_UNANSWERED = (
    _WAITING.where(
        _messages.c.conversation_id == bindparam("target"),
        _messages.c.role == "user",
        _messages.c.seq > _conversations.c.answered_seq,
    )
    .order_by(_messages.c.seq)
    .limit(1)
)
# A regeneration waits as an assistant row, `queued`, under the user message it answers.
_NEXT_QUEUED = (
    _WAITING.where(
        _messages.c.conversation_id == bindparam("target"), _messages.c.status == "queued"
    )
    .order_by(_messages.c.seq)
    .limit(1)
)
_CONVERSATION_KEYS = tuple(column.key for column in _conversations.columns)
_MESSAGE_KEYS = tuple(column.key for column in _messages.columns)
_WAITING_SEQ = len(_CONVERSATION_KEYS) + _MESSAGE_KEYS.index("seq")  # where a row's seq is
_MARK_ANSWERED = (
    update(_conversations)
    .where(
        _conversations.c.id == bindparam("target"),
        _conversations.c.answered_seq < bindparam("upto"),
    )
    .values(answered_seq=bindparam("upto"))
)
_FINISH_MESSAGE = _UPDATE_MESSAGE.returning(*_messages.columns)


def core(session: Session) -> Connection:
    """The session's connection: Core statements run on it skip the ORM's execution layer
    (half a millisecond of a new conversation's first message; see bench/NOTEBOOK.md).
    Kept in the session's `info` (a session lives for one transaction): asking the session
    for it again costs 50 µs a statement."""
    info = session.info
    connection: Connection | None = info.get("core")
    if connection is None:
        connection = info["core"] = session.connection()
    return connection


def new_conversation(session: Session, **fields: Any) -> Conversation:
    now = utcnow()
    values = fields | {"id": new_id(), "created_at": now, "updated_at": now, "answered_seq": 0}
    core(session).execute(_INSERT_CONVERSATION, values)
    return Conversation(**values)


def find_client_msg(
    session: Session, owner: str, conversation_id: str | None, client_msg_id: str
) -> tuple[Conversation, Message] | None:
    params = {"owner": owner, "cmid": client_msg_id}
    if conversation_id is not None:
        params["target"] = conversation_id
    query = _FIND_CLIENT_MSG if conversation_id is None else _FIND_CLIENT_MSG_IN
    found = core(session).execute(query, params).first()
    if found is None:
        return None
    conv, message = session.get(Conversation, found[0]), session.get(Message, found[1])
    assert conv is not None and message is not None  # read in this transaction
    return conv, message


def insert_row(
    session: Session, conversation_id: str, role: str, fields: dict[str, Any]
) -> Message:
    taken = take_seq(session, conversation_id)
    if taken is None:
        raise StoreError("no such conversation")
    return add_row(session, conversation_id, taken[1], role=role, **fields)


def take_seq(
    session: Session, conversation_id: str, *, owner: str | None = None
) -> tuple[Conversation, int] | None:
    """The conversation (as updated) and the next seq in it; None if it is not there (or not
    `owner`'s). One statement: the write comes first, so it holds the row's lock."""
    # Taking the next seq with UPDATE ... RETURNING locks the conversation row, so seq stays
    # gap-free and unique under concurrent writers (SQLite and PostgreSQL alike).
    params = {"target": conversation_id, "now": utcnow()}
    if owner is None:
        row = core(session).execute(_TAKE_SEQ, params).first()
    else:
        row = core(session).execute(_TAKE_SEQ_OWNED, params | {"owner_": owner}).first()
    if row is None:
        return None
    conv = Conversation(**row._mapping)  # detached, as every row a Store call hands out
    return conv, conv.last_seq


def add_row(session: Session, conversation_id: str, seq: int, **fields: Any) -> Message:
    now = utcnow()
    values = _MESSAGE_DEFAULTS | fields
    values.update(
        id=fields.get("id") or new_id(),
        conversation_id=conversation_id,
        seq=seq,
        created_at=now,
        updated_at=now,
    )
    # Unset columns are left out, so they are SQL NULL (None would be JSON `null` in a JSON one).
    core(session).execute(
        _INSERT_MESSAGE, {key: value for key, value in values.items() if value is not None}
    )
    return Message(**values)


def update_row(session: Session, message_id: str, fields: dict[str, Any]) -> None:
    core(session).execute(
        _UPDATE_MESSAGE, {"message_id": message_id, "updated_at": utcnow(), **fields}
    )


def checkpoint_rows(session: Session, texts: list[tuple[str, str]]) -> None:
    """Several replies' text so far: one statement, executed for each (executemany)."""
    now = utcnow()
    core(session).execute(
        _UPDATE_MESSAGE,
        [
            {"message_id": message_id, "content": text, "updated_at": now}
            for message_id, text in texts
        ],
    )


def next_unanswered(session: Session, conversation_id: str) -> tuple[Conversation, Message] | None:
    """The oldest work waiting in the conversation: a user message above `answered_seq`, or a
    `queued` regeneration, whichever was stored first. Both rows detached (Core, no ORM load)."""
    connection, params = core(session), {"target": conversation_id}
    found = connection.execute(_NEXT_UNANSWERED, params).first()
    queued = connection.execute(_NEXT_QUEUED, params).first()
    if found is None or (queued is not None and queued[_WAITING_SEQ] < found[_WAITING_SEQ]):
        found = queued
    if found is None:
        return None
    split = len(_CONVERSATION_KEYS)
    conv = Conversation(**dict(zip(_CONVERSATION_KEYS, found[:split], strict=True)))
    return conv, Message(**dict(zip(_MESSAGE_KEYS, found[split:], strict=True)))


def mark_answered(session: Session, conversation_id: str, seq: int) -> None:
    """The reply to user message `seq` is settled: it leaves the queue (never moves back)."""
    core(session).execute(_MARK_ANSWERED, {"target": conversation_id, "upto": seq})


def finish_row(session: Session, message_id: str, fields: dict[str, Any]) -> Message | None:
    """Store a reply's final fields and read the row back, in one statement."""
    row = (
        core(session)
        .execute(_FINISH_MESSAGE, {"message_id": message_id, "updated_at": utcnow(), **fields})
        .first()
    )
    return None if row is None else Message(**row._mapping)
