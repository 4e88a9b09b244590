"""The search itself: one query against the index the 0006 migration keeps (docs/search.md).

SQLite matches with FTS5 and ranks by bm25; PostgreSQL matches a tsquery and ranks by
ts_rank_cd. Both filter by owner inside the index (an FTS5 column; a btree_gin key), rank the
recently active conversations first among equal scores, and page by offset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Integer, String, bindparam, text
from sqlalchemy.orm import Session

from .query import Query, to_fts5, to_tsquery
from .snippet import snippet

if TYPE_CHECKING:
    from ..store.repo import Store

ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Filters:
    """What narrows a search besides its words; dates are aware, compared in UTC."""

    conversation_id: str | None = None
    role: str | None = None
    after: datetime | None = None
    before: datetime | None = None

    def key(self) -> str:
        return "|".join(str(v) for v in (self.conversation_id, self.role, self.after, self.before))


@dataclass(frozen=True)
class Hit:
    kind: str
    conversation_id: str
    conversation_title: str
    message_id: str | None
    seq: int | None
    role: str | None
    created_at: datetime
    snippet: str
    highlights: list[tuple[int, int]]
    on_active_path: bool


# The page is ranked first, over the index and the conversations alone; only its few rows then
# read their message's text (for the snippet). Joining the messages before the sort would read
# the text of every match of a common word.
RANKED = """
WITH page AS (
    SELECT d.id, d.kind, d.ref_id, d.attachment_id, d.conversation_id, d.role, d.created_at,
           c.title AS conversation_title, c.updated_at, {score} AS score
    {source}
    ORDER BY score, c.updated_at DESC, d.id DESC
    LIMIT :limit OFFSET :offset
)
SELECT page.kind, page.ref_id, page.conversation_id, page.role, page.created_at,
       page.conversation_title, m.seq,
       CASE WHEN page.kind = 'attachment' THEN a.filename || ': ' || COALESCE(a.text, '')
            ELSE COALESCE(m.content, page.conversation_title) END AS body
FROM page
LEFT JOIN messages m ON page.kind IN ('message', 'attachment') AND m.id = page.ref_id
LEFT JOIN attachments a ON page.kind = 'attachment' AND a.id = page.attachment_id
ORDER BY page.score, page.updated_at DESC, page.id DESC
"""

SQLITE = RANKED.format(
    score="bm25(search_fts, 1.0, 0.0)",  # lower is better; the owner column weighs nothing
    source="""FROM search_fts f
    JOIN search_docs d ON d.id = f.rowid
    JOIN conversations c ON c.id = d.conversation_id
    WHERE search_fts MATCH :match {filters}""",
)

POSTGRES = RANKED.format(
    score="-ts_rank_cd(d.tsv, q.query)",  # negated: lower is better, as bm25
    source="""FROM search_docs d
    JOIN conversations c ON c.id = d.conversation_id
    CROSS JOIN {tsquery} AS q(query)
    WHERE d.owner = :owner AND d.tsv @@ q.query {filters}""",
)


def _utc(moment: datetime) -> datetime:
    # SQLite keeps Cortex's UTC times as naive text: compare like with like.
    return moment.astimezone(UTC).replace(tzinfo=None)


def _statement(dialect: str, owner: str, query: Query, filters: Filters) -> Any:
    params: dict[str, Any] = {}
    where: list[str] = []
    if filters.conversation_id is not None:
        where.append("AND d.conversation_id = :conversation_id")
        params["conversation_id"] = filters.conversation_id
    if filters.role is not None:
        where.append("AND d.role = :role")
        params["role"] = filters.role
    sqlite = dialect == "sqlite"
    for name, op in (("after", ">="), ("before", "<")):
        moment: datetime | None = getattr(filters, name)
        if moment is not None:
            where.append(f"AND d.created_at {op} :{name}")
            params[name] = _utc(moment) if sqlite else moment.astimezone(UTC)
    if sqlite:
        # The owner is one token of the `owner` column: the hex of its name.
        owner_token = owner.encode("utf-8", "surrogatepass").hex()
        params["match"] = f'(owner : "{owner_token}") AND ({to_fts5(query)})'
        sql = SQLITE.format(filters=" ".join(where))
    else:
        tsquery, tsparams = to_tsquery(query)
        params.update(tsparams, owner=owner)
        sql = POSTGRES.format(tsquery=f"(SELECT {tsquery})", filters=" ".join(where))
    stmt = text(sql).bindparams(**params)
    for name in ("after", "before"):
        if name in params:
            stmt = stmt.bindparams(
                bindparam(name, params[name], type_=DateTime(timezone=not sqlite))
            )
    return stmt.columns(
        kind=String,
        ref_id=String,
        conversation_id=String,
        role=String,
        created_at=DateTime(timezone=True),
        conversation_title=String,
        seq=Integer,
        body=String,
    )


async def on_active_path(store: Store, hits: list[Hit]) -> list[Hit]:
    """Mark each message hit on its conversation's active path, as the page shows it; a hit on
    another branch is opened read-only there, with a button to switch to it. Title hits have
    no message and count as on the path."""
    conversations = [h.conversation_id for h in hits if h.message_id is not None]
    if not conversations:
        return hits
    active = await store.active_path_ids(*conversations)
    return [replace(h, on_active_path=h.message_id is None or h.message_id in active) for h in hits]


async def search(
    store: Store,
    *,
    owner: str,
    query: Query,
    filters: Filters,
    limit: int,
    offset: int = 0,
) -> tuple[list[Hit], bool]:
    """A page of the owner's hits, best first, and whether there are more."""
    if query.empty:
        return [], False
    stmt = _statement(store.engine.dialect.name, owner, query, filters).bindparams(
        limit=limit + 1, offset=offset
    )

    def read(session: Session) -> list[Any]:
        return list(session.execute(stmt).all())

    rows = await store.run(read)
    hits = []
    for row in rows[:limit]:
        created = row.created_at
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        text_snippet, ranges = snippet(row.body or "", query)
        message = row.kind in ("message", "attachment")  # a file hit opens its message
        hits.append(
            Hit(
                kind=row.kind,
                conversation_id=row.conversation_id,
                conversation_title=row.conversation_title,
                message_id=row.ref_id if message else None,
                seq=row.seq if message else None,
                role=row.role if message else None,
                created_at=created,
                snippet=text_snippet,
                highlights=ranges,
                on_active_path=True,
            )
        )
    return await on_active_path(store, hits), len(rows) > limit
