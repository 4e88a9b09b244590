"""Per-conversation sampling temperature.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: existing conversations keep the server's default (CORTEX_TEMPERATURE).
    op.add_column("conversations", sa.Column("temperature", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("temperature")
