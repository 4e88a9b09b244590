"""Fan-out across processes over Redis pub/sub (docs/scaling.md).

Every event of conversation C is delivered to this process's own subscribers at once and
published on the channel `cortex:ev:C`; each process relays what it reads there to its own
subscribers. One publisher task sends everything this process publishes through one connection,
in order, so Redis hands every process the events of one publisher in the order they happened.

The text of a reply in progress is kept in Redis beside its deltas (`APPEND` right before the
`PUBLISH` of the same delta, in the same pipeline): a client that subscribes on another process
reads the text so far, then gets every later delta live, with no gap between the two.

Redis going away costs only the other processes' events: local clients keep being served, the
publisher drops what it cannot send, and the listener reconnects and resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from ..protocol import DeltaFrame, delta_frame
from .hub import Hub

log = logging.getLogger("cortex.redis")

EVENTS = "cortex:ev:"
TEXT = "cortex:text:"
CONTROL = "cortex:control"
TEXT_TTL_MS = 3_600_000  # a reply's text so far outlives a crashed writer by at most an hour
OUTBOX_MAX = 100_000  # commands kept while Redis is away; the oldest go first
WATCH_TIMEOUT = 5.0
_DELTA_PREFIX = '{"type":"delta"'

Command = tuple[str, ...]


class RedisHub(Hub):
    """A `Hub` whose events also reach (and come from) every other Cortex process."""

    def __init__(self, url: str, *, delta_interval_s: float = 0.0) -> None:
        super().__init__(delta_interval_s=delta_interval_s)
        self.origin = os.urandom(6).hex()  # tells this process's own events apart
        self._redis: Redis = Redis.from_url(url, decode_responses=True)
        self._outbox: deque[Command] = deque(maxlen=OUTBOX_MAX)
        self._wakeup = asyncio.Event()
        self._channels: dict[str, asyncio.Future[None]] = {}  # channel -> subscribed
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._lost_at: datetime | None = None  # when Redis went away, until resubscribed
        # Called with (conversation, since) for each conversation followed here once Redis is
        # back: events published meanwhile never came, so its clients are caught up from the
        # database.
        self.on_resync: Callable[[str, datetime], Awaitable[None]] | None = None

    @property
    def redis(self) -> Redis:
        return self._redis

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="redis-publisher"),
            asyncio.create_task(self._listen_loop(), name="redis-listener"),
        ]
        with contextlib.suppress(TimeoutError):  # not fatal: it keeps reconnecting
            await asyncio.wait_for(self._wait_connected(), WATCH_TIMEOUT)

    async def _wait_connected(self) -> None:
        while not self._connected:  # noqa: ASYNC110 - bounded by the caller's timeout
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self._flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._redis.aclose()

    async def _flush(self) -> None:
        """Give queued events a moment to leave before the connection closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while self._outbox and self._connected:  # noqa: ASYNC110 - bounded
                    await asyncio.sleep(0.01)

    def healthy(self) -> bool:
        return self._connected

    # ---- out ----------------------------------------------------------------------------

    def emit(self, conversation_id: str, frame: str) -> None:
        self.deliver_local(conversation_id, frame)
        self._send(("PUBLISH", EVENTS + conversation_id, f"{self.origin}\n{frame}"))

    def relay(self, topic: str, frame: str) -> None:
        self._send(("PUBLISH", EVENTS + topic, f"{self.origin}\n{frame}"))

    def emit_delta(self, conversation_id: str, message_id: str, offset: int, text: str) -> None:
        frame = delta_frame(conversation_id, message_id, offset, text)
        self.deliver_local(conversation_id, frame)
        key = TEXT + message_id
        self._send(("APPEND", key, text))
        if offset == 0:
            self._send(("PEXPIRE", key, str(TEXT_TTL_MS)))
        self._send(("PUBLISH", EVENTS + conversation_id, f"{self.origin}\n{frame}"))

    def reply_finished(self, message_id: str) -> None:
        self._send(("DEL", TEXT + message_id))

    def control(self, message: dict[str, Any]) -> None:
        self._send(("PUBLISH", CONTROL, json.dumps({**message, "origin": self.origin})))

    def _send(self, command: Command) -> None:
        self._outbox.append(command)
        self._wakeup.set()

    async def _publish_loop(self) -> None:
        """Send queued commands in order, as many per round trip as are waiting."""
        outbox = self._outbox
        while True:
            if not outbox:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = list(outbox)
            outbox.clear()
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for command in batch:
                        pipe.execute_command(*command)
                    await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                # Other processes miss these events; the database still has every message,
                # and their clients catch up when they resubscribe.
                log.warning("dropped %d events for other processes: %s", len(batch), exc)
                await asyncio.sleep(0.5)

    async def reply_text(self, message_id: str) -> str | None:
        try:
            text = await self._redis.get(TEXT + message_id)
        except (RedisError, OSError):
            return None
        return str(text) if text is not None else None

    # ---- in -----------------------------------------------------------------------------

    async def watch(self, conversation_id: str) -> None:
        channel = EVENTS + conversation_id
        subscribed = self._channels.get(channel)
        if subscribed is None:
            subscribed = asyncio.get_running_loop().create_future()
            self._channels[channel] = subscribed
            pubsub = self._pubsub
            if pubsub is not None and self._connected:
                try:
                    await pubsub.subscribe(channel)
                except (RedisError, OSError) as exc:
                    log.warning("could not subscribe to %s: %s", channel, exc)
        if not self._connected:
            return  # Redis is away: the listener subscribes on reconnect and catches clients up
        try:
            await asyncio.wait_for(asyncio.shield(subscribed), WATCH_TIMEOUT)
        except TimeoutError:
            # Redis is away: local events still flow; the listener subscribes on reconnect.
            log.warning("events of %s from other processes are delayed", conversation_id)

    async def housekeeping(self) -> None:
        """Leave the channels of conversations nobody here follows any more."""
        idle = [
            channel
            for channel, done in self._channels.items()
            if done.done() and not self._subs.get(channel[len(EVENTS) :])
        ]
        for channel in idle:
            del self._channels[channel]
        if idle and self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(*idle)

    async def _listen_loop(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                # Every channel counts as not yet subscribed until Redis confirms it again.
                for channel, done in list(self._channels.items()):
                    if done.done():
                        self._channels[channel] = asyncio.get_running_loop().create_future()
                await pubsub.subscribe(CONTROL, *self._channels)
                self._pubsub = pubsub
                async for message in pubsub.listen():
                    self._receive(message)
                    if not self._connected and message["channel"] == CONTROL:
                        self._connected = True  # the control channel is subscribed first
                        backoff = 0.1
                        log.info("connected to Redis")
                        if self._lost_at is not None:
                            self._resync(self._lost_at)
                            self._lost_at = None
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self._connected:
                    log.error("lost Redis (%s); serving local clients, reconnecting", exc)
                    # A little earlier: what was published just before the error may be lost too.
                    self._lost_at = datetime.now(UTC) - timedelta(seconds=5)
                self._connected = False
            except Exception:
                log.exception("the Redis listener failed; reconnecting")
                self._connected = False
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _resync(self, since: datetime) -> None:
        """Once every channel is subscribed again, catch up the clients of each."""
        waiting = dict(self._channels)

        async def resync() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting.values()), WATCH_TIMEOUT)
            for channel in waiting:
                conversation_id = channel[len(EVENTS) :]
                if self.on_resync is not None and self._subs.get(conversation_id):
                    try:
                        await self.on_resync(conversation_id, since)
                    except Exception:
                        log.exception("could not catch up the clients of %s", conversation_id)

        task = asyncio.create_task(resync(), name="redis-resync")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _receive(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if kind == "subscribe":
            done = self._channels.get(channel)
            if done is not None and not done.done():
                done.set_result(None)
            return
        if kind != "message":
            return
        data: str = message["data"]
        if channel == CONTROL:
            self._control_received(data)
            return
        origin, _, frame = data.partition("\n")
        if origin == self.origin:
            return  # delivered locally when it was published
        conversation_id = channel[len(EVENTS) :]
        if conversation_id not in self._subs:
            return
        if frame.startswith(_DELTA_PREFIX):
            frame = _delta_from_json(frame)  # so that a lagging writer can merge it
        self.deliver_local(conversation_id, frame)

    def _control_received(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if message.get("origin") == self.origin or self.on_control is None:
            return
        try:
            self.on_control(message)
        except Exception:
            log.exception("control message failed: %s", data[:200])


def _delta_from_json(raw: str) -> DeltaFrame | str:
    try:
        event = json.loads(raw)
        frame = delta_frame(
            event["conversation_id"], event["message_id"], int(event["offset"]), event["text"]
        )
    except (ValueError, KeyError, TypeError):
        return raw
    return frame
