"""Full-text search at scale: latency by kind of query, index size, and what the index adds to
storing a message, on SQLite and on PostgreSQL (docs/search.md).

Generates N messages (default 1,000,000) over 10,000 conversations and 100 users: user
messages short, replies longer (log-normal lengths), words drawn from a Zipf vocabulary (a few
hundred common English words, then a long tail of made-up ones), and some accented words. The
rows are bulk-loaded with the search triggers off (executemany; COPY on PostgreSQL), then
indexed by the migration's own backfill statements, so the load is quick and the index is the
one Cortex builds.

Then, through Cortex's own search (`cortex.search`: the parser, the SQL, the snippets):
p50/p99 for common words, rare words, phrases and prefixes; the index's size against the data;
and the time to store a message through `Store.add_message` with the triggers on and off,
alternating, on the same database.

    python bench/search.py --messages 100000          # develop with this
    python bench/search.py                              # the full 1,000,000
    python bench/search.py --backends sqlite --messages 20000 --queries 50
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text

from cortex.config import Settings
from cortex.search.index import Filters, search
from cortex.search.query import parse
from cortex.store import Store, make_engine, migrate
from cortex.store.models import new_id
from cortex.testing.services import PostgresServer

REPO = Path(__file__).resolve().parent.parent
MIGRATION = REPO / "cortex/store/migrations/versions/0006_search.py"
COMMON = (
    "the be to of and a in that have it for not on with he as you do at this but his by from "
    "they we say her she or an will my one all would there their what so up out if about who "
    "get which go me when make can like time no just him know take people into year your good "
    "some could them see other than then now look only come its over think also back after use "
    "two how our work first well way even new want because any these give day most us key file "
    "server error config database token python code function value list data user model run"
).split()
ACCENTED = ["café", "crème", "naïve", "über", "señor", "résumé", "façade", "jalapeño"]
SYLLABLES = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"] + ["qu", "th", "sh", "ch"]


def load_migration() -> ModuleType:
    """The 0006 migration as a module: its SQL is the index the bench measures."""
    spec = importlib.util.spec_from_file_location("search_migration", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Corpus:
    """A Zipf vocabulary and the texts drawn from it, reproducibly."""

    def __init__(self, seed: int, vocabulary: int = 60_000) -> None:
        self.rng = random.Random(seed)
        made: set[str] = set(COMMON) | set(ACCENTED)
        words = [*COMMON, *ACCENTED]
        while len(words) < vocabulary:
            word = "".join(self.rng.choices(SYLLABLES, k=self.rng.randint(2, 4)))
            if word not in made:
                made.add(word)
                words.append(word)
        self.words = words
        weights = [1 / (rank + 1) ** 1.07 for rank in range(len(words))]
        total = 0.0
        self.cumulative = []
        for weight in weights:
            total += weight
            self.cumulative.append(total)

    def text(self, role: str) -> str:
        mu = 2.5 if role == "user" else 4.3  # about 15 and 90 words, with a long tail
        n = max(1, min(2000, int(self.rng.lognormvariate(mu, 0.8))))
        words = self.rng.choices(self.words, cum_weights=self.cumulative, k=n)
        return " ".join(words).capitalize() + "."


def rows(args: argparse.Namespace, corpus: Corpus) -> Iterator[tuple[Any, ...]]:
    """(conversation id, owner, seq, role, content, created_at) for every message."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    per = math.ceil(args.messages / args.conversations)
    made = 0
    for c in range(args.conversations):
        conv = f"c{c:08d}"
        for seq in range(1, per + 1):
            if made == args.messages:
                return
            made += 1
            role = "user" if seq % 2 else "assistant"
            at = start + timedelta(minutes=c * 10 + seq)
            yield conv, f"user{c % args.users}", seq, role, corpus.text(role), at


def conversations(args: argparse.Namespace) -> list[tuple[Any, ...]]:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        (
            f"c{c:08d}",
            f"user{c % args.users}",
            f"Conversation {c}",
            start + timedelta(minutes=c * 10),
        )
        for c in range(args.conversations)
    ]


CONV_SQL = (
    "INSERT INTO conversations (id, owner, title, created_at, updated_at, last_seq,"
    " answered_seq) VALUES ({0}, {1}, {2}, {3}, {4}, 0, 0)"
)
MSG_COLUMNS = (
    "id",
    "conversation_id",
    "seq",
    "role",
    "content",
    "status",
    "created_at",
    "updated_at",
)


# Stored messages take their seqs from here: new ones go after the loaded ones.
LAST_SEQ = (
    "UPDATE conversations SET last_seq = (SELECT coalesce(max(seq), 0) FROM messages m"
    " WHERE m.conversation_id = conversations.id)"
)


def message_record(row: tuple[Any, ...]) -> tuple[Any, ...]:
    conv, _owner, seq, role, content, at = row
    return (new_id(), conv, seq, role, content, "complete", at, at)


def sqlite_time(moment: datetime) -> str:
    return moment.replace(tzinfo=None).isoformat(sep=" ")  # as SQLAlchemy stores it


def load_sqlite(
    path: Path, args: argparse.Namespace, corpus: Corpus, m: ModuleType
) -> dict[str, float]:
    db = sqlite3.connect(path)
    triggers = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    for name in triggers:
        db.execute(f"DROP TRIGGER {name}")
    t0 = time.perf_counter()
    db.executemany(
        CONV_SQL.format("?", "?", "?", "?", "?"),
        [(i, o, t, sqlite_time(at), sqlite_time(at)) for i, o, t, at in conversations(args)],
    )
    batch: list[tuple[Any, ...]] = []
    sql = f"INSERT INTO messages ({', '.join(MSG_COLUMNS)}) VALUES ({', '.join('?' * 8)})"
    for row in rows(args, corpus):
        record = message_record(row)
        batch.append((*record[:6], sqlite_time(record[6]), sqlite_time(record[7])))
        if len(batch) == 20_000:
            db.executemany(sql, batch)
            batch.clear()
    db.executemany(sql, batch)
    db.execute(LAST_SEQ)
    db.commit()
    loaded = time.perf_counter() - t0
    db.execute("VACUUM")
    data_bytes = path.stat().st_size
    t0 = time.perf_counter()
    for statement in m.SQLITE_BACKFILL:
        db.execute(statement)
    for statement in m.SQLITE_TRIGGERS:
        db.execute(statement)
    db.commit()
    indexed = time.perf_counter() - t0
    db.execute("INSERT INTO search_fts(search_fts) VALUES ('optimize')")
    db.commit()
    db.execute("VACUUM")
    db.close()
    total = path.stat().st_size
    return {
        "load_s": loaded,
        "index_s": indexed,
        "data_mb": data_bytes / 1e6,
        "index_mb": (total - data_bytes) / 1e6,
    }


async def load_postgres(
    dsn: str, args: argparse.Namespace, corpus: Corpus, m: ModuleType
) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    for name, table in [
        ("search_message_insert", "messages"),
        ("search_message_update", "messages"),
        ("search_message_delete", "messages"),
        ("search_title_insert", "conversations"),
        ("search_title_update", "conversations"),
        ("search_conversation_delete", "conversations"),
    ]:
        await conn.execute(f"DROP TRIGGER {name} ON {table}")
    t0 = time.perf_counter()
    await conn.copy_records_to_table(
        "conversations",
        records=[(i, o, t, at, at, 0, 0) for i, o, t, at in conversations(args)],
        columns=["id", "owner", "title", "created_at", "updated_at", "last_seq", "answered_seq"],
    )
    batch: list[tuple[Any, ...]] = []
    for row in rows(args, corpus):
        batch.append(message_record(row))
        if len(batch) == 20_000:
            await conn.copy_records_to_table("messages", records=batch, columns=MSG_COLUMNS)
            batch.clear()
    await conn.copy_records_to_table("messages", records=batch, columns=MSG_COLUMNS)
    await conn.execute(LAST_SEQ)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    for statement in m.PG_BACKFILL + m.PG_TRIGGERS:
        await conn.execute(statement)
    await conn.execute("VACUUM ANALYZE")
    indexed = time.perf_counter() - t0
    sizes = await conn.fetchrow(
        "SELECT pg_total_relation_size('messages') + pg_total_relation_size('conversations') AS d,"
        " pg_total_relation_size('search_docs') AS i"
    )
    await conn.close()
    return {
        "load_s": loaded,
        "index_s": indexed,
        "data_mb": sizes["d"] / 1e6,
        "index_mb": sizes["i"] / 1e6,
    }


def query_sets(corpus: Corpus, n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    tail = corpus.words[3000:]

    def phrase() -> str:
        words = corpus.text("assistant").rstrip(".").lower().split()
        i = rng.randrange(max(1, len(words) - 1))
        return '"' + " ".join(words[i : i + 2]) + '"'

    return {
        "common": [rng.choice(COMMON[:60]) for _ in range(n)],
        "rare": [rng.choice(tail) for _ in range(n)],
        "phrase": [phrase() for _ in range(n)],
        "prefix": [rng.choice(corpus.words[200:3000])[:3] + "*" for _ in range(n)],
        "two words": [
            f"{rng.choice(COMMON)} {rng.choice(corpus.words[100:5000])}" for _ in range(n)
        ],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    url: str, args: argparse.Namespace, corpus: Corpus, m: ModuleType, postgres: bool
) -> dict[str, Any]:
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    engine = make_engine(settings)
    store = Store(engine)
    out: dict[str, Any] = {"latency_ms": {}}
    try:
        for kind, queries in query_sets(corpus, args.queries, args.seed + 1).items():
            times, hits = [], 0
            for i, q in enumerate(queries):
                owner = f"user{i % args.users}"
                t0 = time.perf_counter()
                found, _ = await search(
                    store, owner=owner, query=parse(q), filters=Filters(), limit=20
                )
                times.append((time.perf_counter() - t0) * 1000)
                hits += len(found)
            out["latency_ms"][kind] = (
                statistics.median(times),
                percentile(times, 0.99),
                hits / len(queries),
            )
        out["store_ms"] = await store_cost(store, args, corpus, m, postgres)
    finally:
        await store.close()
        await engine.dispose()
    return out


async def store_cost(
    store: Store, args: argparse.Namespace, corpus: Corpus, m: ModuleType, postgres: bool
) -> dict[str, float]:
    """Mean ms to store one message through Store.add_message, triggers on and off, alternating."""
    names = [
        ("search_message_insert", "messages"),
        ("search_message_update", "messages"),
        ("search_message_delete", "messages"),
    ]
    create = [s for s in (m.PG_TRIGGERS if postgres else m.SQLITE_TRIGGERS) if "ON messages" in s]
    rng = random.Random(args.seed + 2)
    runs: dict[str, list[float]] = {"with index": [], "without": []}
    for _round in range(args.rounds):
        for mode in ("with index", "without"):

            def ddl(session: Any, mode: str = mode) -> None:
                for name, table in names:
                    session.execute(
                        text(
                            f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgres else "")
                        )
                    )
                if mode == "with index":
                    for statement in create:
                        session.execute(text(statement))

            await store.run(ddl)
            texts = [corpus.text(rng.choice(["user", "assistant"])) for _ in range(args.writes)]
            t0 = time.perf_counter()
            for content in texts:
                conv = f"c{rng.randrange(args.conversations):08d}"
                await store.add_message(conversation_id=conv, role="assistant", content=content)
            runs[mode].append((time.perf_counter() - t0) * 1000 / args.writes)
    return {mode: statistics.median(values) for mode, values in runs.items()}


def report(name: str, sizes: dict[str, float], result: dict[str, Any]) -> None:
    print(f"\n== {name} ==")
    print(f"load {sizes['load_s']:.1f} s (triggers off), index build {sizes['index_s']:.1f} s")
    print(
        f"data {sizes['data_mb']:.0f} MB, index {sizes['index_mb']:.0f} MB "
        f"({sizes['index_mb'] / sizes['data_mb'] * 100:.0f}% of the data)"
    )
    print(f"{'query':<10} {'p50 ms':>8} {'p99 ms':>8} {'hits/query':>10}")
    for kind, (p50, p99, hits) in result["latency_ms"].items():
        print(f"{kind:<10} {p50:>8.1f} {p99:>8.1f} {hits:>10.1f}")
    cost = result["store_ms"]
    extra = (cost["with index"] / cost["without"] - 1) * 100
    print(
        f"store a message: {cost['with index']:.2f} ms with the index, {cost['without']:.2f} ms "
        f"without ({extra:+.0f}%)"
    )


async def main(args: argparse.Namespace) -> None:
    m = load_migration()
    corpus = Corpus(args.seed)
    print(
        f"{args.messages:,} messages, {args.conversations:,} conversations, {args.users} users, "
        f"{args.queries} queries a kind, {args.writes} writes x {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="cortex-search-bench-") as folder:
        if "sqlite" in args.backends:
            path = Path(folder) / "bench.db"
            url = f"sqlite+aiosqlite:///{path}"
            await asyncio.to_thread(migrate, url)
            corpus.rng.seed(args.seed)
            sizes = await asyncio.to_thread(load_sqlite, path, args, corpus, m)
            report(
                "SQLite " + sqlite3.sqlite_version,
                sizes,
                await measure(url, args, corpus, m, False),
            )
        if "postgres" in args.backends:
            with PostgresServer() as pg:
                url = pg.create_database("bench")
                await asyncio.to_thread(migrate, url)
                corpus.rng.seed(args.seed)
                dsn = url.replace("postgresql+asyncpg", "postgresql")
                sizes = await load_postgres(dsn, args, corpus, m)
                report("PostgreSQL", sizes, await measure(url, args, corpus, m, True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--writes", type=int, default=500, help="messages stored per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds with and without the index")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--seed", type=int, default=23)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
