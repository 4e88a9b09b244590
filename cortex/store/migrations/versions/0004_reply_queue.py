"""The reply queue lives in the database, so any process can answer any conversation.

`conversations.answered_seq` is the seq of the last user message whose reply is settled (done,
failed, cancelled or interrupted); user messages above it wait for their reply, in seq order.
`messages.reply_options` keeps what a `send` asked of its reply (model, tools, temperature), for
whichever process answers it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "conversations",
        sa.Column("answered_seq", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("messages", sa.Column("reply_options", sa.JSON, nullable=True))
    # Everything stored before this revision counts as answered: an upgrade must not make a
    # server answer old messages again.
    op.execute("UPDATE conversations SET answered_seq = last_seq")
    op.create_index(
        "ix_messages_conversation_role_seq", "messages", ["conversation_id", "role", "seq"]
    )


def downgrade() -> None:
    op.drop_index("ix_messages_conversation_role_seq", "messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("reply_options")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("answered_seq")
