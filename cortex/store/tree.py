"""The statements of a conversation's tree: paths, siblings, subtrees, the active path.

Every walk is one recursive query along `parent_id` (up) or `active_child_id` (down), so it
costs O(path length), never O(conversation). Plain functions of a `Session`, like
`statements`; the transactions that use them are in `repo`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

from sqlalchemy import Boolean, Table, bindparam, column, select, text, update
from sqlalchemy.orm import Session

from .models import Conversation, Message
from .statements import ContextMessage, StoreError, add_row, core, take_seq

# A reply's context keeps assistant text the user has seen; failed partial replies are left out
# (a failed tool result still answers its call).
CONTEXT_STATUSES = frozenset({"complete", "cancelled", "interrupted"})
# Statuses of a row some worker will still write: the conversation is busy while one exists.
OPEN_STATUSES = ("streaming", "queued")
_DEPTH_MAX = 1_000_000  # a guard: a corrupted row pointing at its own descendant ends the walk

_conversations = cast(Table, Conversation.__table__)
_messages = cast(Table, Message.__table__)

_UP = f"""
WITH RECURSIVE path(id, parent_id, active_child_id, seq, depth) AS (
    SELECT id, parent_id, active_child_id, seq, 0 FROM messages
    WHERE id = :leaf AND conversation_id = :target
    UNION ALL
    SELECT m.id, m.parent_id, m.active_child_id, m.seq, p.depth + 1
    FROM messages m JOIN path p ON m.id = p.parent_id
    WHERE p.depth < {_DEPTH_MAX}
)
"""
_PATH = text(_UP + "SELECT id, active_child_id, seq FROM path ORDER BY depth DESC")
_PATH_CONTEXT = text(
    _UP + "SELECT m.role, m.content, m.tool_calls, m.tool_call_id, m.status, m.id, "
    # Whether the message carries files: a turn with none skips the attachments lookup.
    "EXISTS (SELECT 1 FROM message_attachments ma WHERE ma.message_id = m.id) AS has_files "
    "FROM path JOIN messages m ON m.id = path.id ORDER BY path.depth DESC"
).columns(
    _messages.c.role,
    _messages.c.content,
    _messages.c.tool_calls,
    _messages.c.tool_call_id,
    _messages.c.status,
    _messages.c.id,
    column("has_files", Boolean),
)
_DOWN = text(
    f"""
WITH RECURSIVE down(id, child, depth) AS (
    SELECT id, active_child_id, 0 FROM messages WHERE id = :start AND conversation_id = :target
    UNION ALL
    SELECT m.id, m.active_child_id, d.depth + 1
    FROM messages m JOIN down d ON m.id = d.child
    WHERE m.conversation_id = :target AND d.depth < {_DEPTH_MAX}
)
SELECT id FROM down ORDER BY depth DESC LIMIT 1
"""
)
_SUBTREE = text(
    f"""
WITH RECURSIVE sub(id, depth) AS (
    SELECT id, 0 FROM messages WHERE id = :start AND conversation_id = :target
    UNION ALL
    SELECT m.id, s.depth + 1 FROM messages m JOIN sub s ON m.parent_id = s.id
    WHERE m.conversation_id = :target AND s.depth < {_DEPTH_MAX}
)
SELECT id FROM sub
"""
)
_SET_CHILD = (
    update(_messages)
    .where(_messages.c.id == bindparam("parent"))
    .values(active_child_id=bindparam("child"))
)
_SET_LEAF = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("target"))
    .values(active_leaf_id=bindparam("leaf"))
)

# The active path grows to a new row if it ended at the row's parent (at nothing, for a root).
_GROW = (
    update(_conversations)
    .where(_conversations.c.id == bindparam("target"))
    .values(active_leaf_id=bindparam("child"))
)
_EXTEND_ROOT = _GROW.where(_conversations.c.active_leaf_id.is_(None))
_EXTEND = _GROW.where(_conversations.c.active_leaf_id == bindparam("parent"))

_WAITING_USER = (
    select(_messages.c.id)
    .where(
        _messages.c.conversation_id == bindparam("target"),
        _messages.c.role == "user",
        _messages.c.seq > bindparam("answered"),
    )
    .limit(1)
)
_OPEN_ROW = (
    select(_messages.c.id)
    .where(
        _messages.c.conversation_id == bindparam("target"),
        _messages.c.status.in_(OPEN_STATUSES),
    )
    .limit(1)
)


class Step(NamedTuple):
    """A message on a path: its id, the child it last had active, its seq."""

    id: str
    active_child_id: str | None
    seq: int


def path(session: Session, conversation_id: str, leaf_id: str | None) -> list[Step]:
    """Each message from the root down to `leaf_id`; [] if there is no such message."""
    if leaf_id is None:
        return []
    rows = core(session).execute(_PATH, {"leaf": leaf_id, "target": conversation_id})
    return [Step(row[0], row[1], row[2]) for row in rows]


def path_ids(session: Session, conversation_id: str, leaf_id: str | None) -> list[str]:
    return [step.id for step in path(session, conversation_id, leaf_id)]


def path_context(session: Session, conversation_id: str, leaf_id: str) -> list[ContextMessage]:
    """What the model sees when it answers at `leaf_id`: the path to it, root first."""
    rows = core(session).execute(_PATH_CONTEXT, {"leaf": leaf_id, "target": conversation_id})
    return [
        ContextMessage(role, content, tool_calls, tool_call_id, message_id, bool(has_files))
        for role, content, tool_calls, tool_call_id, status, message_id, has_files in rows
        if status in CONTEXT_STATUSES or role == "tool"
    ]


def make_active(session: Session, conversation_id: str, node_id: str | None) -> None:
    """Make the active path end at `node_id`: each message on the way remembers the child the
    path takes (only those that change are written)."""
    steps = path(session, conversation_id, node_id)
    changed = [
        {"parent": parent.id, "child": child.id}
        for parent, child in zip(steps, steps[1:], strict=False)
        if parent.active_child_id != child.id
    ]
    if changed:
        core(session).execute(_SET_CHILD, changed)
    core(session).execute(_SET_LEAF, {"target": conversation_id, "leaf": node_id})


def extend(session: Session, conversation_id: str, parent_id: str | None, child_id: str) -> bool:
    """A new row under `parent_id`: the parent remembers it, and the active path grows to it
    if the path ended at the parent (a reply whose branch was switched away stays off it)."""
    if parent_id is not None:
        core(session).execute(_SET_CHILD, {"parent": parent_id, "child": child_id})
    statement = _EXTEND_ROOT if parent_id is None else _EXTEND
    moved = core(session).execute(
        statement, {"target": conversation_id, "parent": parent_id, "child": child_id}
    )
    return bool(getattr(moved, "rowcount", 0))


def descend(session: Session, conversation_id: str, start_id: str) -> str:
    """The leaf reached from `start_id` down the children last active beneath it."""
    found = core(session).execute(_DOWN, {"start": start_id, "target": conversation_id}).first()
    return str(found[0]) if found is not None else start_id


def subtree_ids(session: Session, conversation_id: str, start_id: str) -> list[str]:
    rows = core(session).execute(_SUBTREE, {"start": start_id, "target": conversation_id})
    return [row[0] for row in rows]


def siblings(
    session: Session, conversation_id: str, parent_ids: Iterable[str | None]
) -> dict[str | None, list[str]]:
    """The ids of the children of each parent (None: the roots), in seq order."""
    wanted = set(parent_ids)
    named = [parent for parent in wanted if parent is not None]
    query = select(_messages.c.parent_id, _messages.c.id, _messages.c.seq).where(
        _messages.c.conversation_id == conversation_id
    )
    conditions: list[Any] = []
    if named:
        conditions.append(_messages.c.parent_id.in_(named))
    if None in wanted:
        conditions.append(_messages.c.parent_id.is_(None))
    found: list[tuple[str | None, str, int]] = []
    for condition in conditions:
        # Sorted here, not by ORDER BY seq: that would tempt the planner into the seq index,
        # a walk through the whole conversation instead of the parent index.
        found.extend(
            (row[0], row[1], row[2]) for row in core(session).execute(query.where(condition))
        )
    by_parent: dict[str | None, list[str]] = {parent: [] for parent in wanted}
    for parent, message_id, _seq in sorted(found, key=lambda row: row[2]):
        by_parent[parent].append(message_id)
    return by_parent


def busy(session: Session, conversation_id: str, answered_seq: int) -> bool:
    """Whether a reply runs or waits in the conversation (a send then queues)."""
    connection, params = core(session), {"target": conversation_id, "answered": answered_seq}
    return (
        connection.execute(_WAITING_USER, params).first() is not None
        or connection.execute(_OPEN_ROW, params).first() is not None
    )


def open_turn(
    session: Session,
    conversation_id: str,
    parent_id: str,
    model: str,
    on_context: Callable[[list[ContextMessage]], None] | None = None,
) -> tuple[list[ContextMessage], Message]:
    """What the model sees for a turn that follows `parent_id` (the path to it), and the row
    (empty, `streaming`) the turn streams into, as the parent's child. The context is read
    first: the new row is not in it. `on_context` hears the context as soon as it is read,
    while the row is still to be written and committed (the model request starts then)."""
    context = path_context(session, conversation_id, parent_id)
    if on_context is not None:
        on_context(context)
    if not context and session.get(Message, parent_id) is None:
        raise StoreError("the branch of this reply was deleted")
    taken = take_seq(session, conversation_id)
    if taken is None:
        raise StoreError("no such conversation")
    row = add_row(
        session,
        conversation_id,
        taken[1],
        role="assistant",
        content="",
        status="streaming",
        model=model,
        parent_id=parent_id,
    )
    extend(session, conversation_id, parent_id, row.id)
    return context, row


def insert_child(
    session: Session, conversation_id: str, parent_id: str, role: str, fields: dict[str, Any]
) -> Message:
    """A row of a reply (a tool result, a closing note) under the row before it."""
    if session.get(Message, parent_id) is None:
        raise StoreError("the branch of this reply was deleted")
    taken = take_seq(session, conversation_id)
    if taken is None:
        raise StoreError("no such conversation")
    row = add_row(session, conversation_id, taken[1], role=role, parent_id=parent_id, **fields)
    extend(session, conversation_id, parent_id, row.id)
    return row


def skip_waiting(session: Session, conversation_id: str, upto_seq: int) -> list[str]:
    """The waiting turns of the old path are not answered (an edit or a regenerate came):
    user messages up to `upto_seq` leave the queue, regenerations waiting are cancelled.
    The ids of those cancelled."""
    core(session).execute(
        update(_conversations)
        .where(
            _conversations.c.id == conversation_id,
            _conversations.c.answered_seq < upto_seq,
        )
        .values(answered_seq=upto_seq)
    )
    queued = core(session).execute(
        update(_messages)
        .where(_messages.c.conversation_id == conversation_id, _messages.c.status == "queued")
        .values(status="cancelled", finish_reason="cancelled")
        .returning(_messages.c.id)
    )
    return [row[0] for row in queued]
