"""Full-text search: one row per searchable text in `search_docs`, indexed per owner.

Kept in step by triggers, in the transaction that writes the message or the title: user and
assistant messages once they leave `streaming`, conversation titles (`kind` 'message' or
'title'; attachments will add 'attachment'). Tool messages are not indexed. Deleting a message
or a conversation deletes its rows. The first `INDEXED_CHARS` characters of a text are indexed.

SQLite: an FTS5 table `search_fts(body, owner)` whose rowid is `search_docs.id`, tokenizer
`unicode61 remove_diacritics 2`; the owner is a column of it (hex of the owner's name, one
token), so a search matches the owner and the words in one index lookup.
PostgreSQL: `search_docs.tsv` = to_tsvector('simple', unaccent(text)) and a GIN index on
(owner, tsv) (btree_gin); `cortex_unaccent` is unaccent() declared IMMUTABLE with its dictionary
named, which is what lets an index and a trigger use it.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXED_CHARS = 100_000  # a tsvector holds at most 1 MB: a longer text is indexed this far
ELIGIBLE = "NEW.role IN ('user', 'assistant') AND NEW.status <> 'streaming'"

SQLITE_FTS = (
    "CREATE VIRTUAL TABLE search_fts USING fts5("
    "body, owner, tokenize = 'unicode61 remove_diacritics 2')"
)


def _sqlite_insert(kind: str, ref: str, conv: str, role: str, created: str, body: str) -> str:
    """The statements that index one text (inside a trigger, with NEW in scope)."""
    return f"""
        INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at)
            SELECT '{kind}', {ref}, {conv}, c.owner, {role}, {created}
            FROM conversations c WHERE c.id = {conv};
        INSERT INTO search_fts (rowid, body, owner)
            SELECT d.id, substr({body}, 1, {INDEXED_CHARS}), lower(hex(d.owner))
            FROM search_docs d WHERE d.kind = '{kind}' AND d.ref_id = {ref};
    """


# FTS5 writes each transaction's terms as a new segment and merges segments as they pile up;
# letting 16 pile up before a merge (the default is 4) makes storing a message cheaper on
# average (bench/search.py), for a few more segments for a search to read.
SQLITE_FTS_CONFIG = "INSERT INTO search_fts (search_fts, rank) VALUES ('automerge', 16)"

SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER search_message_insert AFTER INSERT ON messages
    WHEN {ELIGIBLE} AND NEW.content <> '' BEGIN
    {
        _sqlite_insert(
            "message", "NEW.id", "NEW.conversation_id", "NEW.role", "NEW.created_at", "NEW.content"
        )
    }
    END""",
    # Checkpoints of a streaming reply change nothing: only leaving `streaming` (or a later
    # change of a final row) does.
    f"""CREATE TRIGGER search_message_update AFTER UPDATE OF content, status, role ON messages
    WHEN OLD.status <> 'streaming' OR NEW.status <> 'streaming' BEGIN
    DELETE FROM search_docs WHERE kind = 'message' AND ref_id = OLD.id;
    {
        _sqlite_insert(
            "message", "NEW.id", "NEW.conversation_id", "NEW.role", "NEW.created_at", "NEW.content"
        ).replace(
            "WHERE c.id = NEW.conversation_id;",
            f"WHERE c.id = NEW.conversation_id AND {ELIGIBLE} AND NEW.content <> '';",
        )
    }
    END""",
    """CREATE TRIGGER search_message_delete AFTER DELETE ON messages BEGIN
    DELETE FROM search_docs WHERE kind = 'message' AND ref_id = OLD.id;
    END""",
    f"""CREATE TRIGGER search_title_insert AFTER INSERT ON conversations
    WHEN NEW.title <> '' BEGIN
    {_sqlite_insert("title", "NEW.id", "NEW.id", "NULL", "NEW.created_at", "NEW.title")}
    END""",
    f"""CREATE TRIGGER search_title_update AFTER UPDATE OF title ON conversations BEGIN
    DELETE FROM search_docs WHERE kind = 'title' AND ref_id = OLD.id;
    {
        _sqlite_insert("title", "NEW.id", "NEW.id", "NULL", "NEW.created_at", "NEW.title").replace(
            "WHERE c.id = NEW.id;", "WHERE c.id = NEW.id AND NEW.title <> '';"
        )
    }
    END""",
    """CREATE TRIGGER search_conversation_delete AFTER DELETE ON conversations BEGIN
    DELETE FROM search_docs WHERE conversation_id = OLD.id;
    END""",
    """CREATE TRIGGER search_docs_delete AFTER DELETE ON search_docs BEGIN
    DELETE FROM search_fts WHERE rowid = OLD.id;
    END""",
]

SQLITE_BACKFILL = [
    """INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at)
    SELECT 'message', m.id, m.conversation_id, c.owner, m.role, m.created_at
    FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.role IN ('user', 'assistant') AND m.status <> 'streaming' AND m.content <> ''""",
    """INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at)
    SELECT 'title', c.id, c.id, c.owner, NULL, c.created_at FROM conversations c
    WHERE c.title <> ''""",
    f"""INSERT INTO search_fts (rowid, body, owner)
    SELECT d.id, substr(m.content, 1, {INDEXED_CHARS}), lower(hex(d.owner))
    FROM search_docs d JOIN messages m ON m.id = d.ref_id WHERE d.kind = 'message'""",
    f"""INSERT INTO search_fts (rowid, body, owner)
    SELECT d.id, substr(c.title, 1, {INDEXED_CHARS}), lower(hex(d.owner))
    FROM search_docs d JOIN conversations c ON c.id = d.ref_id WHERE d.kind = 'title'""",
]

PG_VECTOR = f"to_tsvector('simple', cortex_unaccent(left({{}}, {INDEXED_CHARS})))"

PG_FUNCTIONS = [
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    "CREATE EXTENSION IF NOT EXISTS btree_gin",
    # unaccent(text) is STABLE (it reads the search_path); with its dictionary named it gives
    # the same answer for the same text, so this wrapper may say IMMUTABLE.
    """CREATE OR REPLACE FUNCTION cortex_unaccent(text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
    AS $$ SELECT public.unaccent('public.unaccent'::regdictionary, $1) $$""",
    f"""CREATE OR REPLACE FUNCTION cortex_search_message() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            DELETE FROM search_docs WHERE kind = 'message' AND ref_id = OLD.id;
        END IF;
        IF TG_OP <> 'DELETE' AND {ELIGIBLE} AND NEW.content <> '' THEN
            INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at, tsv)
            SELECT 'message', NEW.id, NEW.conversation_id, c.owner, NEW.role, NEW.created_at,
                   {PG_VECTOR.format("NEW.content")}
            FROM conversations c WHERE c.id = NEW.conversation_id;
        END IF;
        RETURN NULL;
    END $$""",
    f"""CREATE OR REPLACE FUNCTION cortex_search_title() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            DELETE FROM search_docs WHERE conversation_id = OLD.id;
            RETURN NULL;
        END IF;
        IF TG_OP = 'UPDATE' THEN
            DELETE FROM search_docs WHERE kind = 'title' AND ref_id = OLD.id;
        END IF;
        IF NEW.title <> '' THEN
            INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at, tsv)
            VALUES ('title', NEW.id, NEW.id, NEW.owner, NULL, NEW.created_at,
                    {PG_VECTOR.format("NEW.title")});
        END IF;
        RETURN NULL;
    END $$""",
]

PG_TRIGGERS = [
    f"""CREATE TRIGGER search_message_insert AFTER INSERT ON messages FOR EACH ROW
    WHEN ({ELIGIBLE}) EXECUTE FUNCTION cortex_search_message()""",
    """CREATE TRIGGER search_message_update AFTER UPDATE OF content, status, role ON messages
    FOR EACH ROW WHEN (OLD.status <> 'streaming' OR NEW.status <> 'streaming')
    EXECUTE FUNCTION cortex_search_message()""",
    """CREATE TRIGGER search_message_delete AFTER DELETE ON messages FOR EACH ROW
    EXECUTE FUNCTION cortex_search_message()""",
    """CREATE TRIGGER search_title_insert AFTER INSERT ON conversations FOR EACH ROW
    EXECUTE FUNCTION cortex_search_title()""",
    """CREATE TRIGGER search_title_update AFTER UPDATE OF title ON conversations FOR EACH ROW
    EXECUTE FUNCTION cortex_search_title()""",
    """CREATE TRIGGER search_conversation_delete AFTER DELETE ON conversations FOR EACH ROW
    EXECUTE FUNCTION cortex_search_title()""",
]

PG_BACKFILL = [
    f"""INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at, tsv)
    SELECT 'message', m.id, m.conversation_id, c.owner, m.role, m.created_at,
           {PG_VECTOR.format("m.content")}
    FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.role IN ('user', 'assistant') AND m.status <> 'streaming' AND m.content <> ''""",
    f"""INSERT INTO search_docs (kind, ref_id, conversation_id, owner, role, created_at, tsv)
    SELECT 'title', c.id, c.id, c.owner, NULL, c.created_at, {PG_VECTOR.format("c.title")}
    FROM conversations c WHERE c.title <> ''""",
]


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "search_docs",
        # SQLite: INTEGER PRIMARY KEY is the rowid, which the FTS5 row shares.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref_id", sa.String(64), nullable=False),
        sa.Column("conversation_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        *([sa.Column("tsv", postgresql.TSVECTOR, nullable=False)] if postgres else []),
    )
    op.create_index("ix_search_docs_kind_ref", "search_docs", ["kind", "ref_id"], unique=True)
    op.create_index("ix_search_docs_conversation", "search_docs", ["conversation_id"])
    if postgres:
        for statement in PG_FUNCTIONS:
            op.execute(statement)
        op.execute("CREATE INDEX ix_search_docs_owner_tsv ON search_docs USING gin (owner, tsv)")
        for statement in PG_TRIGGERS + PG_BACKFILL:
            op.execute(statement)
    else:
        op.execute(SQLITE_FTS)
        op.execute(SQLITE_FTS_CONFIG)
        for statement in SQLITE_TRIGGERS + SQLITE_BACKFILL:
            op.execute(statement)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for name, table in [
        ("search_message_insert", "messages"),
        ("search_message_update", "messages"),
        ("search_message_delete", "messages"),
        ("search_title_insert", "conversations"),
        ("search_title_update", "conversations"),
        ("search_conversation_delete", "conversations"),
    ]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgres else ""))
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS cortex_search_message()")
        op.execute("DROP FUNCTION IF EXISTS cortex_search_title()")
        op.execute("DROP FUNCTION IF EXISTS cortex_unaccent(text)")
    else:
        op.execute("DROP TRIGGER IF EXISTS search_docs_delete")
        op.execute("DROP TABLE IF EXISTS search_fts")
    op.drop_table("search_docs")
