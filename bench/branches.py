"""What conversation trees cost (issue #20): reading the active path and switching branches in a
big tree against a small one, and what `parent_id` adds to a `send`.

    .venv/bin/python bench/branches.py [--messages 10000] [--branch-points 1000]
                                       [--path 100] [--repeat 200] [--json]

Two conversations are built in one SQLite file (migrated by alembic), both with an active path
of `--path` messages: the big one of `--messages` messages with `--branch-points` side branches
hanging off random messages (so about 10 messages a branch), the small one a tenth of both.
The timings go through the `Store` calls the server makes, each one transaction:

- history: `Store.path_page(limit=50)`, the newest 50 messages of the active path with their
  sibling ids (what `history` and the HTTP API read);
- switch: `Store.switch_branch` to a leaf of a side branch and back, alternating;
- send: `Store.add_user_message` appending to a linear conversation (what a `send` stores,
  with its parent, the busy check and the active-leaf update), against one creating a new
  conversation. The lead compares this with main's figure from the same command.

Both reads must be O(path), not O(conversation): the big/small ratio should be close to 1.
The database is built with bulk inserts (the rows a server would have stored), not by replaying
10,000 sends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import insert  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from cortex.config import Settings  # noqa: E402
from cortex.store import Store, make_engine, migrate  # noqa: E402
from cortex.store.models import Conversation, Message, new_id, utcnow  # noqa: E402


def build(messages: int, branch_points: int, path: int, seed: int) -> dict[str, Any]:
    """The rows of one conversation: a trunk of `path` messages (the active path), then side
    branches off random messages until `messages` rows exist. Returns the rows and two leaves
    to switch between."""
    rng = random.Random(seed)
    conversation_id = new_id()
    now = utcnow()
    rows: list[dict[str, Any]] = []
    children: dict[str, str] = {}

    def add(parent: str | None) -> str:
        message_id = new_id()
        role = "user" if len(rows) % 2 == 0 else "assistant"
        rows.append(
            {
                "id": message_id,
                "conversation_id": conversation_id,
                "seq": len(rows) + 1,
                "role": role,
                "content": f"message {len(rows) + 1} " + "lorem ipsum " * 20,
                "status": "complete",
                "parent_id": parent,
                "created_at": now,
                "updated_at": now,
            }
        )
        if parent is not None:
            children.setdefault(parent, message_id)
        return message_id

    trunk: list[str] = []
    for _ in range(path):
        trunk.append(add(trunk[-1] if trunk else None))
    per_branch = max(1, (messages - path) // max(1, branch_points))
    leaves: list[str] = []
    while len(rows) < messages:
        tip = rng.choice(rows)["id"]
        for _ in range(min(per_branch, messages - len(rows))):
            tip = add(tip)
        leaves.append(tip)
    for row in rows:
        row["active_child_id"] = children.get(row["id"])
    # The trunk was built first, so each trunk message remembers the next: the active path.
    conversation = {
        "id": conversation_id,
        "owner": "bench",
        "title": "bench",
        "last_seq": len(rows),
        "answered_seq": len(rows),
        "active_leaf_id": trunk[-1],
        "created_at": now,
        "updated_at": now,
    }
    return {"conversation": conversation, "rows": rows, "leaves": [leaves[-1], trunk[-1]]}


async def timed(fn: Callable[[], Awaitable[object]], repeat: int) -> dict[str, float]:
    """Median and p95 milliseconds of `repeat` calls, after a few to warm up. A call that
    returns a float timed itself (seconds): that part is what counts."""
    for _ in range(5):
        await fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        own = await fn()
        spent = own if isinstance(own, float) else time.perf_counter() - started
        samples.append(spent * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 3),
    }


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    url = f"sqlite+aiosqlite:///{workdir / 'branches.db'}"
    await asyncio.to_thread(migrate, url)
    engine = make_engine(Settings(database_url=url))
    store = Store(engine)
    results: dict[str, Any] = {"params": vars(args)}
    try:
        sizes = {
            "big": build(args.messages, args.branch_points, args.path, 1),
            "small": build(args.messages // 10, args.branch_points // 10, args.path, 2),
        }
        for built in sizes.values():

            def load(session: Session, built: dict[str, Any] = built) -> None:
                session.execute(insert(Conversation), [built["conversation"]])
                session.execute(insert(Message), built["rows"])

            await store._run(load)
        for name, built in sizes.items():
            cid = built["conversation"]["id"]
            page = await store.path_page(cid, limit=50)
            assert page is not None and len(page.rows) == 50

            async def read(cid: str = cid) -> None:
                await store.path_page(cid, limit=50)

            history = await timed(read, args.repeat)
            leaves = built["leaves"]
            turn = {"n": 0}

            async def switch(
                cid: str = cid, leaves: list[str] = leaves, turn: dict[str, int] = turn
            ) -> None:
                turn["n"] += 1
                await store.switch_branch(
                    owner="bench", conversation_id=cid, message_id=leaves[turn["n"] % 2]
                )

            results[name] = {
                "messages": len(built["rows"]),
                "history_50": history,
                "switch_branch": await timed(switch, args.repeat),
            }
        for name in ("history_50", "switch_branch"):
            big, small = results["big"][name]["median_ms"], results["small"][name]["median_ms"]
            results[f"{name}_big_over_small"] = round(big / small, 2)

        first = await store.add_user_message(
            owner="bench", conversation_id=None, content="hi", client_msg_id=None
        )
        assert first is not None
        line = first.conversation.id
        await store.mark_answered(line, 1)  # as if its reply had come (replies are not timed)
        counter = {"n": 0}

        async def send_line() -> float:
            counter["n"] += 1
            started = time.perf_counter()
            await store.add_user_message(
                owner="bench", conversation_id=line, content=f"m{counter['n']}", client_msg_id=None
            )
            spent = time.perf_counter() - started
            # Settled at once, like a reply that finished (untimed): the next send is not queued.
            await store.mark_answered(line, counter["n"] + 1)
            return spent

        async def send_new() -> None:
            await store.add_user_message(
                owner="bench", conversation_id=None, content="new", client_msg_id=None
            )

        results["send_linear"] = await timed(send_line, args.repeat)
        results["send_new_conversation"] = await timed(send_new, args.repeat)
        path = await store.active_path_ids(line)
        assert len(path) == counter["n"] + 1  # every send extended the one path
    finally:
        await store.close()
        await engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--branch-points", type=int, default=1_000)
    parser.add_argument("--path", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        results = asyncio.run(measure(args, Path(workdir)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name in ("big", "small"):
        part = results[name]
        print(
            f"{name:5} {part['messages']:6} messages: history(50) {part['history_50']} "
            f"switch {part['switch_branch']}"
        )
    print(
        f"big/small: history {results['history_50_big_over_small']}x, "
        f"switch {results['switch_branch_big_over_small']}x"
    )
    print(f"send (linear, with parent_id): {results['send_linear']}")
    print(f"send (new conversation):       {results['send_new_conversation']}")


if __name__ == "__main__":
    main()
