"""Conversations become trees: each message has a parent, the conversation an active leaf.

`messages.parent_id` is the message a message follows on its branch (NULL for the first);
siblings are read by parent, hence the index with the conversation. `messages.active_child_id`
is the child last active beneath a message, so a switch to a branch walks down it in O(path).
`conversations.active_leaf_id` is the end of the active path every client shares.

Existing conversations were lines, but queued sends make seq order wrong for a line (A, B,
reply to A, reply to B): the backfill replays the reply queue instead. A reply's rows (its
assistant turns and the tool results between them) answer the oldest user message still
waiting, which follows the end of the reply before it. The active leaf is the last message.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections import deque

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("parent_id", sa.String(64), nullable=True))
    op.add_column("messages", sa.Column("active_child_id", sa.String(64), nullable=True))
    op.add_column("conversations", sa.Column("active_leaf_id", sa.String(64), nullable=True))
    op.create_index(
        "ix_messages_conversation_parent", "messages", ["conversation_id", "parent_id", "seq"]
    )
    backfill(op.get_bind())


def backfill(bind: sa.Connection) -> None:
    """Give every stored message its parent, replaying each conversation's reply queue."""
    conversations = [row[0] for row in bind.execute(sa.text("SELECT id FROM conversations"))]
    set_message = sa.text(
        "UPDATE messages SET parent_id = :parent, active_child_id = :child WHERE id = :id"
    )
    set_leaf = sa.text("UPDATE conversations SET active_leaf_id = :leaf WHERE id = :id")
    for conversation_id in conversations:
        rows = bind.execute(
            sa.text("SELECT id, role FROM messages WHERE conversation_id = :c ORDER BY seq"),
            {"c": conversation_id},
        ).all()
        parents = line_parents([(row[0], row[1]) for row in rows])
        children = {parent: child for child, parent in parents.items() if parent is not None}
        if parents:
            bind.execute(
                set_message,
                [
                    {"id": child, "parent": parent, "child": children.get(child)}
                    for child, parent in parents.items()
                ],
            )
        # A line: its one message without a child is the end of the path.
        leaf = next((child for child in parents if child not in children), None)
        bind.execute(set_leaf, {"id": conversation_id, "leaf": leaf})


def line_parents(rows: list[tuple[str, str]]) -> dict[str, str | None]:
    """(id, role) in seq order -> each id's parent, as the reply queue answered them.

    An assistant row after a tool result is the next turn of the same reply; any other
    assistant row starts the reply to the oldest waiting user message.
    """
    parents: dict[str, str | None] = {}
    waiting: deque[str] = deque()
    end: str | None = None  # the last message of the path so far
    tail: str | None = None  # the last row of the reply being replayed
    tail_role = ""
    for message_id, role in rows:
        if role == "user":
            waiting.append(message_id)
            continue
        if role == "assistant" and tail_role != "tool":
            end = tail if tail is not None else end
            if waiting:
                user = waiting.popleft()
                parents[user], end = end, user
            tail = end
        parents[message_id] = tail
        tail, tail_role = message_id, role
    end = tail if tail is not None else end
    for user in waiting:  # never answered: they follow the last reply, in order
        parents[user], end = end, user
    return parents


def downgrade() -> None:
    op.drop_index("ix_messages_conversation_parent", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("active_child_id")
        batch.drop_column("parent_id")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("active_leaf_id")
