"""The search query language: a forgiving parser whose output is always valid FTS5 and tsquery
syntax, whatever the user typed (Hypothesis tries the inputs we did not think of)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.errors import BadFrame, TooLarge
from cortex.search import cursor
from cortex.search.query import MAX_QUERY_CHARS, parse, to_fts5, to_tsquery
from cortex.search.snippet import snippet
from cortex.testing.services import PostgresServer

# Characters that mean something to FTS5, tsquery, SQL or the parser itself, and some text.
SYNTAX = list("\"'*-()[]{}:^+&|!<>\\;%_.,") + ["NEAR(", "OR", "AND", "NOT", "content:", " "]
queries = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from([*SYNTAX, "keys", "rot", "é", "東京", "ß"]), max_size=12).map("".join),
)


def terms(q: str) -> list[tuple[str, tuple[str, ...], bool, bool]]:
    return [(t.text, t.words, t.prefix, t.negated) for t in parse(q).terms]


def test_words_phrases_prefixes_and_exclusions() -> None:
    assert terms('rotate "signing keys" rot* -old') == [
        ("rotate", ("rotate",), False, False),
        ("signing keys", ("signing", "keys"), False, False),
        ("rot", ("rot",), True, False),
        ("old", ("old",), False, True),
    ]
    assert terms('"Café Crème"*') == [("Café Crème", ("cafe", "creme"), True, False)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", []),
        ("   ", []),
        ("-", []),
        ("*", []),
        ("- * -* \"\" ''", []),
        ('"unclosed phrase', [("unclosed phrase", ("unclosed", "phrase"), False, False)]),
        ("NEAR(", [("NEAR(", ("near",), False, False)]),
        ("OR", [("OR", ("or",), False, False)]),
        ("AND", [("AND", ("and",), False, False)]),
        ("content:", [("content:", ("content",), False, False)]),
        (
            "the a of",
            [
                ("the", ("the",), False, False),
                ("a", ("a",), False, False),
                ("of", ("of",), False, False),
            ],
        ),  # no stop words: they are words
        ("'; DROP --", [("DROP", ("drop",), False, False)]),
    ],
)
def test_bad_input_is_forgiven(raw: str, expected: list[object]) -> None:
    assert terms(raw) == expected


def test_only_exclusions_or_no_words_search_nothing() -> None:
    for raw in ["", "-keys", "- * ()"]:
        assert parse(raw).empty
        assert to_fts5(parse(raw)) == ""
        assert to_tsquery(parse(raw)) == ("", {})


def test_an_oversize_query_is_too_large() -> None:
    parse("x" * MAX_QUERY_CHARS)
    with pytest.raises(TooLarge):
        parse("x" * 10_000)


def test_the_compiled_forms_quote_every_term() -> None:
    query = parse('a "b" NEAR( -content: x*')
    assert to_fts5(query) == (
        '(body : ("a" AND "b" AND "NEAR(" AND "x" *)) NOT body : ("content:")'
    )
    sql, params = to_tsquery(query)
    assert "NEAR" not in sql and "content" not in sql  # the user's text is only in parameters
    assert params == {"q0": "a", "q1": "b", "q2": "NEAR(", "q3": "content:", "q4": "'x':*"}


def test_cursors_are_validated_and_tied_to_their_query() -> None:
    token = cursor.encode(20, "alice|rot*")
    assert cursor.decode(token, "alice|rot*") == 20
    forged = [
        "",
        "garbage!",
        "x" * 500,
        cursor.encode(20, "alice|other"),
        cursor.encode(0, "alice|rot*"),
        cursor.encode(10**9, "alice|rot*"),
        "eyJvIjoiMjAiLCJzIjoiIn0",  # {"o":"20","s":""}
        "W10",  # []
    ]
    for bad in forged:
        with pytest.raises(BadFrame):
            cursor.decode(bad, "alice|rot*")


def test_snippet_highlights_phrases_and_prefixes() -> None:
    text, ranges = snippet("Rotate the Signing keys; rotation done.", parse('"signing keys" rot*'))
    assert [text[a:b] for a, b in ranges] == ["Rotate", "Signing keys", "rotation"]


@pytest.fixture(scope="module")
def fts() -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE VIRTUAL TABLE search_fts USING fts5(body, owner, "
        "tokenize = 'unicode61 remove_diacritics 2')"
    )
    db.execute("INSERT INTO search_fts VALUES ('keys rot é 東京 ß near or and', 'ab')")
    yield db
    db.close()


@given(queries)
@settings(max_examples=300, deadline=None)
def test_no_input_makes_invalid_fts5(fts: sqlite3.Connection, raw: str) -> None:
    query = parse(raw)
    match = to_fts5(query)
    if query.empty:
        assert match == ""
        return
    fts.execute("SELECT rowid FROM search_fts WHERE search_fts MATCH ?", (match,)).fetchall()
    snippet("keys rot é 東京 ß near or and", query)


@pytest.fixture(scope="module")
def pg(postgres_server: PostgresServer) -> Iterator[tuple[asyncio.AbstractEventLoop, object]]:
    url = postgres_server.create_database("search_query_syntax")
    dsn = url.replace("postgresql+asyncpg", "postgresql")
    loop = asyncio.new_event_loop()

    async def open_() -> asyncpg.Connection:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE EXTENSION IF NOT EXISTS unaccent")
        await conn.execute(
            "CREATE FUNCTION cortex_unaccent(text) RETURNS text LANGUAGE sql IMMUTABLE STRICT "
            "AS $$ SELECT public.unaccent('public.unaccent'::regdictionary, $1) $$"
        )
        return conn

    conn = loop.run_until_complete(open_())
    yield loop, conn
    loop.run_until_complete(conn.close())
    loop.close()


@given(queries)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_no_input_makes_invalid_tsquery(
    pg: tuple[asyncio.AbstractEventLoop, asyncpg.Connection], raw: str
) -> None:
    loop, conn = pg
    sql, params = to_tsquery(parse(raw))
    if not sql:
        return
    names = list(params)
    for i, name in enumerate(names):
        sql = sql.replace(f":{name})", f"${i + 1})")
    loop.run_until_complete(
        conn.fetch(
            f"SELECT to_tsvector('simple', 'keys rot e 東京 ss') @@ {sql}",
            *[params[n] for n in names],
        )
    )
