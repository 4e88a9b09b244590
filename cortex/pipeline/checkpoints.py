"""Checkpoints of every streaming reply of the process, written together.

A checkpoint bounds what a crash loses of a reply. Written one reply at a time, each was its own
transaction (a session, a commit, a hop to the store's thread): at 200 replies and one
checkpoint each per `CORTEX_CHECKPOINT_MS`, that was 400 transactions a second and a fifth of
the server's CPU. Here the replies that are due join one batch, written in one transaction
(`Store.checkpoint_texts`), one batch at a time. Each reply still checkpoints as often as before,
and its final write still waits for its last checkpoint (the batch's future).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .live import ActiveReply

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)


class Checkpoints:
    """One batch of checkpoints in flight at a time; requests meanwhile join the next."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._due: dict[str, ActiveReply] = {}
        self._next: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    def request(self, active: ActiveReply) -> asyncio.Future[None]:
        """Checkpoint this reply's text in the next batch; the future is done once it is
        stored (or the batch failed: a checkpoint is best effort, the final write is not)."""
        self._due[active.message_id] = active
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="checkpoints")
        return self._next

    async def _write(self) -> None:
        try:
            while self._next is not None:
                due, done = self._due, self._next
                self._due, self._next = {}, None
                try:
                    await self.store.checkpoint_texts(
                        [(message_id, active.text()) for message_id, active in due.items()]
                    )
                except Exception:
                    log.warning("checkpoint of %d replies failed", len(due), exc_info=True)
                finally:
                    done.set_result(None)
        finally:
            self._writer = None
