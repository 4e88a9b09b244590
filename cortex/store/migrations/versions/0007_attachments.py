"""Attachments: files uploaded over the WebSocket, their bytes in chunk rows, and the link
from messages to them (docs/attachments.md).

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "attachments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(8), nullable=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("pages", sa.Integer, nullable=True),
        sa.Column("text", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_attachments_owner", "attachments", ["owner"])
    op.create_index("ix_attachments_owner_sha256", "attachments", ["owner", "sha256"], unique=True)
    op.create_table(
        "attachment_chunks",
        sa.Column(
            "attachment_id",
            sa.String(64),
            sa.ForeignKey("attachments.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "message_attachments",
        sa.Column(
            "message_id",
            sa.String(64),
            sa.ForeignKey("messages.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column(
            "attachment_id",
            sa.String(64),
            sa.ForeignKey("attachments.id", ondelete="CASCADE"),
            nullable=False,
        ),
    )
    op.create_index("ix_message_attachments_attachment", "message_attachments", ["attachment_id"])


def downgrade() -> None:
    op.drop_table("message_attachments")
    op.drop_table("attachment_chunks")
    op.drop_table("attachments")
