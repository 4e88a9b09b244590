"""A search request, checked: its query parsed, its dates read, its cursor validated, one page
read. The WebSocket frame and the HTTP route both come through here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..errors import BadFrame
from . import cursor as cursors
from .index import ROLES, Filters, Hit, search
from .query import parse

if TYPE_CHECKING:
    from ..store.repo import Store


def parse_time(name: str, raw: str | None) -> datetime | None:
    """An ISO 8601 time; one without a zone is UTC, as every time Cortex stores."""
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw.strip().replace("z", "Z"))
    except ValueError as exc:
        raise BadFrame(f"{name} must be an ISO 8601 time, such as 2026-12-04T10:00:00Z") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def run_search(
    store: Store,
    *,
    owner: str,
    query: str,
    limit: int,
    cursor: str | None = None,
    conversation_id: str | None = None,
    role: str | None = None,
    after: str | None = None,
    before: str | None = None,
) -> tuple[list[Hit], str | None]:
    """One page of the owner's hits, and the cursor of the next page (None: the last page)."""
    parsed = parse(query)
    if role is not None and role not in ROLES:
        raise BadFrame(f"role must be one of: {', '.join(ROLES)}")
    filters = Filters(
        conversation_id=conversation_id,
        role=role,
        after=parse_time("after", after),
        before=parse_time("before", before),
    )
    # The cursor belongs to this owner, these words and these filters, and no others.
    scope = "\n".join((owner, parsed.key(), filters.key()))
    offset = cursors.decode(cursor, scope) if cursor else 0
    hits, more = await search(
        store, owner=owner, query=parsed, filters=filters, limit=limit, offset=offset
    )
    more = more and offset + limit <= cursors.MAX_OFFSET
    return hits, cursors.encode(offset + limit, scope) if more else None
