"""Search indexes attachments: each link of a file to a message is a `search_docs` row of kind
'attachment' (its filename and extracted text), kept in step by triggers on
`message_attachments`, like messages and titles in 0006.

The row's `ref_id` is the message that carries the file (a hit opens that message) and the new
`attachment_id` column names the file; a message may carry several, so (kind, ref_id) is no
longer unique.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEXED_CHARS = 100_000  # as 0006
# A file name's dots, dashes and underscores separate words on both databases (PostgreSQL's
# parser would otherwise keep "runbook.txt" as one token, which "runbook" does not match).
NAME = "replace(replace(replace(a.filename, '.', ' '), '-', ' '), '_', ' ')"
BODY = f"{NAME} || char(10) || COALESCE(a.text, '')"
PG_BODY = f"{NAME} || E'\\n' || COALESCE(a.text, '')"
SAME = "kind = 'attachment' AND ref_id = {link}.message_id AND attachment_id = {link}.attachment_id"

SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER search_attachment_link AFTER INSERT ON message_attachments
    WHEN NOT EXISTS (SELECT 1 FROM search_docs WHERE {SAME.format(link="NEW")}) BEGIN
    INSERT INTO search_docs (kind, ref_id, attachment_id, conversation_id, owner, role, created_at)
        SELECT 'attachment', m.id, a.id, m.conversation_id, c.owner, m.role, m.created_at
        FROM messages m
        JOIN conversations c ON c.id = m.conversation_id
        JOIN attachments a ON a.id = NEW.attachment_id
        WHERE m.id = NEW.message_id;
    INSERT INTO search_fts (rowid, body, owner)
        SELECT d.id, substr({BODY}, 1, {INDEXED_CHARS}), lower(hex(d.owner))
        FROM search_docs d JOIN attachments a ON a.id = d.attachment_id
        WHERE d.{SAME.format(link="NEW").replace(" AND ", " AND d.")};
    END""",
    f"""CREATE TRIGGER search_attachment_unlink AFTER DELETE ON message_attachments BEGIN
    DELETE FROM search_docs WHERE {SAME.format(link="OLD")};
    END""",
]

SQLITE_BACKFILL = [
    """INSERT INTO search_docs (kind, ref_id, attachment_id, conversation_id, owner, role,
                             created_at)
    SELECT DISTINCT 'attachment', m.id, ma.attachment_id, m.conversation_id, c.owner, m.role,
           m.created_at
    FROM message_attachments ma
    JOIN messages m ON m.id = ma.message_id
    JOIN conversations c ON c.id = m.conversation_id""",
    f"""INSERT INTO search_fts (rowid, body, owner)
    SELECT d.id, substr({BODY}, 1, {INDEXED_CHARS}), lower(hex(d.owner))
    FROM search_docs d JOIN attachments a ON a.id = d.attachment_id
    WHERE d.kind = 'attachment'""",
]

PG_VECTOR = f"to_tsvector('simple', cortex_unaccent(left({PG_BODY}, {INDEXED_CHARS})))"

PG_FUNCTION = f"""CREATE OR REPLACE FUNCTION cortex_search_attachment() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            DELETE FROM search_docs WHERE {SAME.format(link="OLD")};
            RETURN NULL;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM search_docs WHERE {SAME.format(link="NEW")}) THEN
            INSERT INTO search_docs (kind, ref_id, attachment_id, conversation_id, owner, role,
                                     created_at, tsv)
            SELECT 'attachment', m.id, a.id, m.conversation_id, c.owner, m.role, m.created_at,
                   {PG_VECTOR}
            FROM messages m
            JOIN conversations c ON c.id = m.conversation_id
            JOIN attachments a ON a.id = NEW.attachment_id
            WHERE m.id = NEW.message_id;
        END IF;
        RETURN NULL;
    END $$"""

PG_TRIGGER = """CREATE TRIGGER search_attachment_link
    AFTER INSERT OR DELETE ON message_attachments FOR EACH ROW
    EXECUTE FUNCTION cortex_search_attachment()"""

PG_BACKFILL = f"""INSERT INTO search_docs (kind, ref_id, attachment_id, conversation_id, owner,
                                          role, created_at, tsv)
    SELECT DISTINCT ON (m.id, a.id) 'attachment', m.id, a.id, m.conversation_id, c.owner,
           m.role, m.created_at, {PG_VECTOR}
    FROM message_attachments ma
    JOIN messages m ON m.id = ma.message_id
    JOIN conversations c ON c.id = m.conversation_id
    JOIN attachments a ON a.id = ma.attachment_id"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.add_column("search_docs", sa.Column("attachment_id", sa.String(64), nullable=True))
    op.drop_index("ix_search_docs_kind_ref", table_name="search_docs")
    op.create_index("ix_search_docs_kind_ref", "search_docs", ["kind", "ref_id"])
    if postgres:
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
        op.execute(PG_BACKFILL)
    else:
        for statement in SQLITE_TRIGGERS + SQLITE_BACKFILL:
            op.execute(statement)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        op.execute("DROP TRIGGER IF EXISTS search_attachment_link ON message_attachments")
        op.execute("DROP FUNCTION IF EXISTS cortex_search_attachment()")
    else:
        op.execute("DROP TRIGGER IF EXISTS search_attachment_link")
        op.execute("DROP TRIGGER IF EXISTS search_attachment_unlink")
    op.execute("DELETE FROM search_docs WHERE kind = 'attachment'")
    op.drop_index("ix_search_docs_kind_ref", table_name="search_docs")
    op.create_index("ix_search_docs_kind_ref", "search_docs", ["kind", "ref_id"], unique=True)
    # Not batch mode: SQLite (3.35+) drops the column in place and keeps 0006's triggers.
    op.execute("ALTER TABLE search_docs DROP COLUMN attachment_id")
