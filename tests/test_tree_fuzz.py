"""Random sends, edits, regenerates, switches, deletes, cancels and replies against the store's
tree (issue #20). After every step the tree must be valid: one parent each, inside the
conversation, no cycles, the active path running from a root to the active leaf with every
message on it remembering the child the path takes, and every acknowledged message present
unless a delete_branch took it.

The reply worker is played by the test (start, then finish or cancel), so each example is a
few dozen short transactions on a real, migrated SQLite file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from cortex.errors import BadFrame, NotFound
from cortex.store import Store, make_engine, migrate
from cortex.store.models import Message

OPS = ("send", "send_under", "edit", "regenerate", "switch", "delete", "start", "finish", "cancel")


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('tree') / 'fuzz.db'}"
    migrate(url)
    return url


class World:
    """One conversation, the ids acknowledged and deleted, and the reply being played."""

    def __init__(self, store: Store, conversation_id: str, first: Message) -> None:
        self.store = store
        self.conversation_id = conversation_id
        self.acked: set[str] = {first.id}
        self.deleted: set[str] = set()
        self.streaming: tuple[str, int] | None = None  # (row id, user seq)

    async def rows(self) -> list[Message]:
        query = select(Message).where(Message.conversation_id == self.conversation_id)
        return list(await self.store._run(lambda session: session.scalars(query).all()))

    async def step(self, op: str, pick: int) -> None:
        rows = sorted(await self.rows(), key=lambda row: row.seq)
        users = [row for row in rows if row.role == "user"]
        replies = [row for row in rows if row.role == "assistant"]
        owner, cid = "u", self.conversation_id
        try:
            if op in ("send", "send_under"):
                parent = rows[pick % len(rows)].id if op == "send_under" and rows else None
                stored = await self.store.add_user_message(
                    owner=owner,
                    conversation_id=cid,
                    content=f"m{pick}",
                    client_msg_id=None,
                    parent_id=parent,
                )
                assert stored is not None
                self.acked.add(stored.message.id)
            elif op == "edit" and users:
                change = await self.store.edit_message(
                    owner=owner,
                    conversation_id=cid,
                    message_id=users[pick % len(users)].id,
                    content=f"e{pick}",
                    client_msg_id=None,
                    reply_options={},
                )
                self.acked.add(change.message.id)
                await self.cancel()  # an edit supersedes the reply in progress
            elif op == "regenerate" and replies:
                change = await self.store.regenerate(
                    owner=owner,
                    conversation_id=cid,
                    message_id=replies[pick % len(replies)].id,
                    client_msg_id=None,
                    model=None,
                    reply_options={},
                )
                self.acked.add(change.message.id)
                await self.cancel()
            elif op == "switch" and rows:
                await self.store.switch_branch(
                    owner=owner, conversation_id=cid, message_id=rows[pick % len(rows)].id
                )
            elif op == "delete" and rows:
                _conv, ids, open_rows = await self.store.delete_branch(
                    owner=owner, conversation_id=cid, message_id=rows[pick % len(rows)].id
                )
                self.deleted.update(ids)
                if open_rows:
                    await self.cancel()
            elif op == "start" and self.streaming is None:
                started = await self.store.start_reply(cid, default_model="m")
                if started is not None:
                    self.acked.add(started.row.id)
                    self.streaming = (started.row.id, started.message.seq)
            elif op in ("finish", "cancel"):
                await self.cancel("complete" if op == "finish" else "cancelled")
        except (BadFrame, NotFound):
            pass  # refused input changes nothing: the checks below hold all the same

    async def cancel(self, status: str = "cancelled") -> None:
        if self.streaming is None:
            return
        row_id, user_seq = self.streaming
        self.streaming = None
        await self.store.finish_message(row_id, content="r", status=status)
        await self.store.mark_answered(self.conversation_id, user_seq)

    async def check(self) -> None:
        rows = {row.id: row for row in await self.rows()}
        conv = await self.store.get_conversation_any(self.conversation_id)
        assert conv is not None
        assert len({row.seq for row in rows.values()}) == len(rows)
        for row in rows.values():  # a parent inside the conversation, and no cycle above
            seen = {row.id}
            node = row
            while node.parent_id is not None:
                assert node.parent_id in rows, "a parent outside the conversation"
                node = rows[node.parent_id]
                assert node.id not in seen, "a cycle"
                seen.add(node.id)
        assert self.acked - self.deleted <= set(rows), "an acknowledged message was lost"
        assert not self.deleted & set(rows)
        leaf = conv.active_leaf_id
        if leaf is None:
            assert not rows
            return
        path = [rows[leaf]]
        while path[-1].parent_id is not None:
            path.append(rows[path[-1].parent_id])
        path.reverse()
        for parent, child in zip(path, path[1:], strict=False):
            assert parent.active_child_id == child.id, "the path forgot its way down"
        assert await self.store.active_path_ids(self.conversation_id) == {r.id for r in path}


async def play(database_url: str, tmp_path: Path, steps: list[tuple[str, int]]) -> None:
    engine = make_engine(make_settings(tmp_path, database_url=database_url))
    store = Store(engine)
    try:
        first = await store.add_user_message(
            owner="u", conversation_id=None, content="hi", client_msg_id=None
        )
        assert first is not None
        world = World(store, first.conversation.id, first.message)
        await world.check()
        for op, pick in steps:
            await world.step(op, pick)
            await world.check()
    finally:
        await store.close()
        await engine.dispose()


@settings(
    max_examples=25,
    deadline=None,  # a shared machine: an example's time says nothing about the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1000)), max_size=25))
def test_random_operations_keep_the_tree_valid(
    database_url: str, tmp_path: Path, steps: list[tuple[str, int]]
) -> None:
    asyncio.run(play(database_url, tmp_path, steps))


def test_the_checks_can_fail(database_url: str, tmp_path: Path) -> None:
    """A tree broken by hand (a cycle) is caught: the property above can fail."""

    async def broken() -> None:
        engine = make_engine(make_settings(tmp_path, database_url=database_url))
        store = Store(engine)
        try:
            first = await store.add_user_message(
                owner="u", conversation_id=None, content="hi", client_msg_id=None
            )
            assert first is not None
            world = World(store, first.conversation.id, first.message)
            await world.step("start", 0)
            await world.cancel("complete")
            rows = sorted(await world.rows(), key=lambda row: row.seq)
            await store.update_message(rows[0].id, parent_id=rows[1].id)
            with pytest.raises(AssertionError, match="cycle|path"):
                await world.check()
        finally:
            await store.close()
            await engine.dispose()

    asyncio.run(broken())
