"""Full-text search on a real SQLite file and a real PostgreSQL, migrated by alembic: the same
tests, the same answers (docs/search.md)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from conftest import make_settings
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from cortex.search.index import Filters, Hit, search
from cortex.search.query import parse
from cortex.store import Store, make_engine, migrate
from cortex.store.engine import alembic_config

BOTH_BACKENDS = True


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


async def find(
    store: Store, owner: str, q: str, limit: int = 50, offset: int = 0, **filters: object
) -> list[Hit]:
    hits, _more = await search(
        store,
        owner=owner,
        query=parse(q),
        filters=Filters(**filters),
        limit=limit,
        offset=offset,  # type: ignore[arg-type]
    )
    return hits


async def say(store: Store, owner: str, content: str, conversation_id: str | None = None) -> str:
    stored = await store.add_user_message(
        owner=owner, conversation_id=conversation_id, content=content, client_msg_id=None
    )
    assert stored is not None
    return stored.conversation.id


async def test_words_phrases_prefixes_and_exclusions(store: Store) -> None:
    conv = await say(store, "alice", "How do I rotate the signing keys?")
    await store.add_message(
        conversation_id=conv, role="assistant", content="Rotate keys with `cortex token rotate`."
    )
    await say(store, "alice", "Café crème at the station", conv)

    assert {h.snippet for h in await find(store, "alice", "rotate keys")} >= {
        "How do I rotate the signing keys?"
    }
    assert len(await find(store, "alice", "rotate keys")) == 3  # both messages and the title
    assert [h.kind for h in await find(store, "alice", '"signing keys"')] == ["message", "title"]
    assert len(await find(store, "alice", '"keys signing"')) == 0
    assert len(await find(store, "alice", "rot*")) == 3
    assert [h.role for h in await find(store, "alice", "rotate -signing")] == ["assistant"]
    # Accents fold both ways, and case does not matter.
    assert [h.snippet for h in await find(store, "alice", "CAFE creme")] == [
        "Café crème at the station"
    ]
    assert len(await find(store, "alice", "café")) == 1


async def test_highlights_are_ranges_in_the_plain_text_snippet(store: Store) -> None:
    long = "filler " * 100 + "the Rotation of keys happens here " + "tail " * 100
    await say(store, "alice", long)
    (hit,) = [h for h in await find(store, "alice", "rotat* keys") if h.kind == "message"]
    assert len(hit.snippet) <= 210
    assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["Rotation", "keys"]


async def test_bad_input_gives_results_or_nothing_never_an_error(store: Store) -> None:
    await say(store, "alice", 'Quotes " and stars * and NEAR( and OR AND content: x; DROP')
    for q in ["", "   ", "-", "*", "- * -*", '"', '""', "-keys"]:
        assert await find(store, "alice", q) == [], q
    for q in [
        '"stars',
        "NEAR(",
        "OR",
        "AND",
        "content:",
        "'; DROP --",
        "x'; DROP",
        "stars*)",
        '"and stars *',
        "stars\x00 quotes",
        "quotes \ud800",
    ]:
        hits = await find(store, "alice", q)
        assert hits and all(h.conversation_id for h in hits), q
    for q in ["%", "_", "\\", "'", "`", "{owner}:", "body : x", "^quotes", 'quo"tes']:
        await find(store, "alice", q)  # no error is the point; results depend on the words


async def test_owners_never_see_each_others_hits(store: Store) -> None:
    mine = await say(store, "alice", "the shared secret word is pineapple")
    theirs = await say(store, "bob", "bob also says pineapple and shared")
    assert {h.conversation_id for h in await find(store, "alice", "pineapple")} == {mine}
    assert {h.conversation_id for h in await find(store, "bob", "pineapple shared")} == {theirs}
    assert await find(store, "carol", "pineapple") == []
    # Another user's conversation as a filter finds nothing either.
    assert await find(store, "alice", "pineapple", conversation_id=theirs) == []


async def test_filters_by_conversation_role_and_dates(store: Store) -> None:
    one = await say(store, "alice", "orange report")
    two = await say(store, "alice", "orange juice")
    await store.add_message(conversation_id=two, role="assistant", content="an orange answer")
    await store.add_message(conversation_id=two, role="tool", content="orange tool output")
    assert len(await find(store, "alice", "orange")) == 5  # 3 messages, 2 titles: no tool text
    assert {
        h.conversation_id for h in await find(store, "alice", "orange", conversation_id=one)
    } == {one}
    assert [h.role for h in await find(store, "alice", "orange", role="assistant")] == ["assistant"]
    now = datetime.now(UTC)
    assert len(await find(store, "alice", "orange", after=now - timedelta(minutes=5))) == 5
    assert await find(store, "alice", "orange", after=now + timedelta(minutes=5)) == []
    assert await find(store, "alice", "orange", before=now - timedelta(minutes=5)) == []
    hits = await find(store, "alice", "orange", before=now + timedelta(minutes=5))
    assert len(hits) == 5 and all(h.created_at.tzinfo is not None for h in hits)


async def test_ranking_then_recent_conversations_first_and_paging(store: Store) -> None:
    old = await say(store, "alice", "lemon")
    await say(store, "alice", "something else about lemon, lemon and lemon pie crust", old)
    new = await say(store, "alice", "lemon")
    hits = await find(store, "alice", '"lemon pie"')
    assert [h.conversation_id for h in hits] == [old]
    tied = [h for h in await find(store, "alice", "lemon") if h.snippet == "lemon"]
    assert [h.conversation_id for h in tied][:2] in ([new, new], [new, old])
    everything = await find(store, "alice", "lemon")
    pages = [await find(store, "alice", "lemon", limit=2, offset=o) for o in (0, 2, 4)]
    assert [h for page in pages for h in page] == everything


async def test_a_deleted_conversation_leaves_no_trace(store: Store) -> None:
    conv = await say(store, "alice", "kumquat marmalade")
    await store.update_conversation(conv, owner="alice", title="kumquat notes")
    assert [h.kind for h in await find(store, "alice", "kumquat")] == ["title", "message"] or len(
        await find(store, "alice", "kumquat")
    ) == 2
    assert await store.delete_conversation(conv, owner="alice") == 1
    assert await find(store, "alice", "kumquat") == []
    left = await store.run(lambda session: session.scalar(text("SELECT count(*) FROM search_docs")))
    assert left == 0
    if store.engine.dialect.name == "sqlite":
        fts = await store.run(
            lambda session: session.scalar(text("SELECT count(*) FROM search_fts"))
        )
        assert fts == 0


async def test_a_streaming_reply_is_indexed_only_when_final(store: Store) -> None:
    conv = await say(store, "alice", "question")
    started = await store.start_reply(conv, default_model="m")
    assert started is not None
    await store.update_message(started.row.id, content="partial durian")
    assert await find(store, "alice", "durian") == []
    await store.finish_message(started.row.id, content="final durian answer", status="complete")
    (hit,) = await find(store, "alice", "durian")
    assert (hit.message_id, hit.role, hit.snippet) == (
        started.row.id,
        "assistant",
        "final durian answer",
    )
    assert await find(store, "alice", "partial") == []


async def test_a_rename_reindexes_the_title(store: Store) -> None:
    conv = await say(store, "alice", "first words")
    await store.update_conversation(conv, owner="alice", title="Quarterly planning")
    (hit,) = await find(store, "alice", "quarterly")
    assert (hit.kind, hit.message_id, hit.seq, hit.role) == ("title", None, None, None)
    assert hit.conversation_title == "Quarterly planning"
    assert [h.kind for h in await find(store, "alice", "first")] == ["message"]


async def test_cjk_runs_are_whole_words_found_by_prefix_on_both(store: Store) -> None:
    """Neither tokenizer splits CJK into words: a run of it is one word. So the whole run, or
    its start with `*`, finds it; a word inside the run does not (docs/search.md)."""
    await say(store, "alice", "東京都に住む 友達")
    assert len(await find(store, "alice", "東京都に住む")) == 2  # the message and the title
    assert len(await find(store, "alice", "東京*")) == 2
    assert len(await find(store, "alice", "友達")) == 2
    assert await find(store, "alice", "京都") == []
    (hit,) = [h for h in await find(store, "alice", "東京*") if h.kind == "message"]
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["東京都に住む"]


async def test_the_migration_indexes_existing_rows_and_downgrades(
    database_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(migrate, database_url, "0005")
    engine = make_engine(make_settings(tmp_path, database_url=database_url))
    store = Store(engine)
    try:
        conv = await say(store, "alice", "an old message about quinces")
        # A reply still streaming (stored as the workers store one: `streaming`, then text).
        reply = await store.add_message(conversation_id=conv, role="assistant", status="streaming")
        await store.update_message(reply.id, content="an unfinished quince reply")
        await store.add_message(conversation_id=conv, role="tool", content="quince tool output")
        await asyncio.to_thread(migrate, database_url)  # 0006 indexes what is there
        hits = await find(store, "alice", "quince*")
        assert sorted((h.kind, h.role) for h in hits) == [("message", "user"), ("title", None)]
        await store.finish_message(reply.id, status="interrupted")
        assert len(await find(store, "alice", "quince*")) == 3  # final now: indexed
        await asyncio.to_thread(downgrade, database_url, "0005")
        tables = await store.run(lambda session: sa_inspect(session.connection()).get_table_names())
        assert "search_docs" not in tables and "search_fts" not in tables
        await say(store, "alice", "writes go on without the index", conv)
    finally:
        await store.close()
        await engine.dispose()
