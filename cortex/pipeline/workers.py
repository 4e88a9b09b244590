"""Who answers what, and when: one worker per conversation, leases, the sweep, cancel, drain.

The reply queue is the database (user messages above `answered_seq`), so any process may
answer any conversation; with several processes, only the holder of the conversation's Redis
lease does. A worker answers the waiting messages of its conversation one after another, in seq
order, each through `Replies.answer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import Unavailable
from ..fanout.hub import Hub
from ..protocol import Typing
from .early import EarlyTurn
from .live import Live, PendingReply
from .reply import Replies
from .views import message_event, path_event

if TYPE_CHECKING:
    from ..fanout.leases import Lease, RedisLeases
    from ..store.models import Message
    from ..store.repo import Store

log = logging.getLogger("cortex.router")


class Workers:
    """Starts, stops and drains the per-conversation workers of this process."""

    def __init__(
        self,
        *,
        store: Store,
        hub: Hub,
        live: Live,
        replies: Replies,
        default_model: Callable[[], str],
        leases: RedisLeases | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.live = live
        self.replies = replies
        self.default_model = default_model
        # Several processes share the conversations: a reply needs the conversation's lease.
        # Alone, the one worker per conversation below is lease enough.
        self.leases = leases
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()  # conversations with messages stored since last looked
        self._cancel_next: set[str] = set()  # a cancel that came before its reply started
        self._early: dict[str, EarlyTurn] = {}  # a send's stream, for the worker's next start
        # The newest message of each conversation accepted before a shutdown began: answered
        # even while the server drains.
        self._owed: dict[str, int] = {}
        self.closing = False  # set by drain(): new messages are refused
        self._sends = 0  # sends past the closing check: drain() waits for them
        self._no_sends = asyncio.Event()
        hub.on_control = self._control

    @contextlib.contextmanager
    def accepting(self) -> Iterator[None]:
        """Around storing a message: refused once closing, and waited for by `drain()`."""
        if self.closing:
            raise Unavailable("the server is shutting down; send again on another connection")
        self._sends += 1
        self._no_sends.clear()
        try:
            yield
        finally:
            self._sends -= 1
            if not self._sends:
                self._no_sends.set()

    def early_for_send(self) -> EarlyTurn | None:
        """A reply's first turn, to start from inside a `send`'s transaction (see `early`).
        None with several processes: another may hold the conversation's lease, and a request
        begun here would be one the provider bills for nothing."""
        return self.replies.early() if self.leases is None else None

    def kick(
        self,
        conversation_id: str,
        *,
        owed_seq: int | None = None,
        early: EarlyTurn | None = None,
    ) -> None:
        """Messages may wait in the conversation: make sure a worker looks.

        `owed_seq`: a message accepted before any shutdown began, answered even while closing.
        `early`: the stream a `send` began while its message committed: the worker's next
        start takes it (and cancels it unless its turn asks the very same).
        """
        if owed_seq is not None:
            self._owed[conversation_id] = max(owed_seq, self._owed.get(conversation_id, 0))
        elif self.closing:
            if early is not None:
                early.cancel()
            return
        if early is not None:
            stale = self._early.pop(conversation_id, None)
            if stale is not None:
                stale.cancel()
            self._early[conversation_id] = early
        self._dirty.add(conversation_id)
        if conversation_id not in self._workers:
            task = asyncio.create_task(self._work(conversation_id), name=f"reply:{conversation_id}")
            self._workers[conversation_id] = task

    async def _work(self, conversation_id: str) -> None:
        try:
            if self.leases is None:
                await self._answer_waiting(conversation_id)
                return
            while not self.closing:
                lease = await self.leases.acquire(conversation_id)
                if lease is None:
                    return  # the holder answers it: it looks again after letting go
                try:
                    await self._answer_waiting(conversation_id, lease)
                finally:
                    await lease.release()
                # A message stored while we held the lease may have been left to us: look again.
                self._dirty.discard(conversation_id)
                if await self.store.next_unanswered(conversation_id) is None:
                    if conversation_id not in self._dirty:
                        return
        except Exception:
            log.exception("answering conversation %s failed", conversation_id)
        finally:
            self._workers.pop(conversation_id, None)
            stale = self._early.pop(conversation_id, None)
            if stale is not None:  # no start of this worker took it
                stale.cancel()
            self._cancel_next.discard(conversation_id)
            self._owed.pop(conversation_id, None)

    async def _answer_waiting(self, conversation_id: str, lease: Lease | None = None) -> None:
        if lease is not None:
            # The previous holder died mid-reply: what it streamed is kept as `interrupted`.
            for row in await self.store.settle_streaming(conversation_id):
                self.hub.publish(conversation_id, message_event(row))
        answered: int | None = None  # the reply just settled: marked with the next start
        try:
            while lease is None or not lease.lost:
                if self.closing and conversation_id not in self._owed:
                    return  # what waits stays stored and acknowledged: the next process answers it
                self._dirty.discard(conversation_id)
                # The first turn's model request starts inside start_reply, once the context is
                # read: the provider's wait overlaps the commit (cancelled unless the turn takes
                # it).
                early = self._early.pop(conversation_id, None) or self.replies.early()
                async with self.live.lock(conversation_id):
                    try:
                        started = await self.store.start_reply(
                            conversation_id,
                            default_model=self.default_model(),
                            answered_seq=answered,
                            on_context=early.on_context,
                        )
                    except BaseException:
                        early.cancel()
                        raise
                    answered = None
                    if started is None:
                        early.cancel()
                    else:
                        if started.placed is not None:  # a queued message's parent, now fixed
                            self.hub.publish(conversation_id, message_event(started.placed))
                        if started.moved:
                            self.hub.publish(conversation_id, path_event(started.conversation))
                        typing = Typing(conversation_id=conversation_id, active=True).encode()
                        self.hub.publish(conversation_id, typing)
                        self.hub.publish(conversation_id, message_event(started.row))
                        # Current before the lock is let go: an edit that comes next cancels it.
                        pending = self._pending_reply(conversation_id, started.message, started.row)
                        self.live.current[conversation_id] = pending
                if started is None:
                    if conversation_id in self._dirty:
                        continue  # stored while we looked
                    return
                message = started.message
                if message.seq >= self._owed.get(conversation_id, message.seq + 1):
                    del self._owed[conversation_id]
                if lease is not None:
                    lease.on_lost = lambda p=pending: p.stop(interrupted=True)
                try:
                    await self.replies.answer(started, pending, early)
                except Exception:
                    log.exception("reply failed in conversation %s", conversation_id)
                finally:
                    early.cancel()  # taken or cancelled already, unless answer failed first
                    self.live.active.pop(conversation_id, None)
                    self.live.current.pop(conversation_id, None)
                if lease is not None and lease.lost:
                    return  # another process owns the conversation now, and settles the row
                answered = message.seq
        finally:
            if answered is not None:  # the worker stops before another start marks it
                await asyncio.shield(self.store.mark_answered(conversation_id, answered))

    def _pending_reply(self, conversation_id: str, message: Message, row: Message) -> PendingReply:
        # A regeneration's own options (its model) win over those of the message it answers.
        options = (message.reply_options or {}) | (row.reply_options or {})
        tools = options.get("tools")
        pending = PendingReply(
            seq=message.seq,
            model=options.get("model"),
            tools=tuple(tools) if tools is not None else None,
            temperature=options.get("temperature"),
            request_id=options.get("request_id"),
            connection_id=options.get("connection_id"),
            first_seq=row.seq,
        )
        if conversation_id in self._cancel_next:
            self._cancel_next.discard(conversation_id)
            pending.cancel_requested = True
        return pending

    async def sweep(self) -> None:
        """Pick up conversations whose messages wait with nobody answering: after a restart,
        or when the process that held them died (its lease expired)."""
        for conversation_id in await self.store.conversations_awaiting_reply():
            if conversation_id not in self._workers:
                self.kick(conversation_id)

    # ---- stopping replies ---------------------------------------------------------------

    def cancel(self, conversation_id: str) -> bool:
        """Stop the reply in progress here (or the next one, if it has not started yet);
        with peers, ask them too. False: nothing to cancel."""
        if self._cancel_here(conversation_id):
            return True
        if self.leases is not None:
            self.hub.control({"op": "cancel", "conversation_id": conversation_id})
            return True
        return False

    def _cancel_here(self, conversation_id: str) -> bool:
        target = self.live.current.get(conversation_id)
        if target is None:
            if conversation_id not in self._workers:
                return False
            self._cancel_next.add(conversation_id)  # the worker has yet to start the reply
            return True
        if target.cancel_requested:
            return False
        target.stop()
        return True

    def supersede(self, conversation_id: str, seq: int) -> None:
        """An edit or regenerate stored at `seq`: the reply running for the old path (any
        reply begun before it) stops as `cancelled`, here or on a peer. Unlike `cancel`, a
        reply not yet begun is left alone: it is the new turn's."""
        self._supersede_here(conversation_id, seq)
        if self.leases is not None:
            self.hub.control({"op": "supersede", "conversation_id": conversation_id, "seq": seq})

    def _supersede_here(self, conversation_id: str, seq: int) -> None:
        target = self.live.current.get(conversation_id)
        if target is not None and target.first_seq < seq and not target.cancel_requested:
            target.stop()

    def _control(self, message: dict[str, Any]) -> None:
        """A control message from another process."""
        conversation_id = message.get("conversation_id")
        if not isinstance(conversation_id, str):
            return
        if message.get("op") == "cancel":
            self._cancel_here(conversation_id)
        elif message.get("op") == "supersede" and isinstance(message.get("seq"), int):
            self._supersede_here(conversation_id, message["seq"])

    async def abandon(self, conversation_id: str, *, grace: float = 10.0) -> None:
        """Cancel the conversation's reply and wait for it to stop (it is being deleted):
        afterwards no reply of it writes to the store."""
        if self.leases is not None:
            self.hub.control({"op": "cancel", "conversation_id": conversation_id})
        current = self.live.current.get(conversation_id)
        worker = self._workers.get(conversation_id)
        if worker is None:
            return
        if current is not None:
            current.cancel_requested = True
        worker.cancel()
        await asyncio.wait({worker}, timeout=grace)

    def in_progress(self) -> int:
        """How many conversations are generating a reply now (a metric)."""
        return len(self.live.current)

    async def drain(self, grace: float) -> None:
        """Refuse new messages, let replies in progress (and messages accepted before) finish
        for up to `grace` seconds, then interrupt the rest: each is stored as `interrupted`
        with its final `message`."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace  # one grace period for the sends and the replies
        if self._sends:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_sends.wait(), grace)
        workers = list(self._workers.values())
        if not workers:
            return
        _done, still = await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
        if not still:
            return
        # Messages still waiting stay stored and acknowledged: the next process answers them.
        self._owed.clear()
        for pending in self.live.current.values():
            pending.stop(interrupted=True)
        _done, still = await asyncio.wait(still, timeout=10)
        for task in still:  # a worker stuck past that (a hung tool): stop it outright
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
