"""The WebSocket side: one `Connection` per client, frames in, encoded events out.

Each connection has a bounded outbound queue drained by its own writer task; the hub and the
router only ever `deliver()` to it, which never blocks. A client that stops reading fills its
queue and is closed with 1013, so it cannot slow anyone else or grow memory without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ..config import Settings
from ..errors import CortexError, Internal, RateLimited
from ..fanout.hub import Hub
from ..ops.logs import CONNECTION, CONVERSATION, REQUEST, event
from ..ops.metrics import INVALID, RATE_LIMITED, Metrics
from ..protocol import (
    DeltaFrame,
    ErrorEvent,
    parse_frame,
    request_id_of,
    take_merged_delta,
)
from .dispatch import DispatchTable

log = logging.getLogger("cortex.server")
_ids = itertools.count(1)


class TokenBucket:
    """Per-connection frame rate: `rate` frames a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Connection:
    """One client socket as the hub sees it: `deliver()` queues, a writer task sends."""

    def __init__(
        self,
        ws: ServerConnection,
        owner: str,
        *,
        settings: Settings,
        dispatch: DispatchTable,
        hub: Hub,
        metrics: Metrics,
    ) -> None:
        s = settings
        self.settings = settings
        self.dispatch_table = dispatch
        self.hub = hub
        self.metrics = metrics
        self.ws = ws
        self.owner = owner
        self.id = next(_ids)
        self._queue: deque[str] = deque()
        self._queued_chars = 0
        self._wakeup = asyncio.Event()
        self._max_frames = s.send_queue_max
        self._max_chars = s.send_buffer_bytes
        self._bucket = TokenBucket(s.rate_per_s, s.rate_burst)
        self._strikes = 0
        self.closing = False
        self.opened = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0

    def deliver(self, frame: str) -> None:
        if self.closing:
            return
        queue = self._queue
        if queue and (len(queue) >= self._max_frames or self._queued_chars > self._max_chars):
            # The client does not read what it is sent: drop it rather than buffer forever.
            self.close(CloseCode.TRY_AGAIN_LATER, "slow reader: too many unsent events")
            return
        queue.append(frame)
        self._queued_chars += len(frame)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """Close without waiting (called from deliver(), which must not block)."""
        if self.closing:
            return
        self.closing = True
        self._queue.clear()
        self._wakeup.set()
        self.hub.drop(self)
        asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def write_loop(self) -> None:
        queue, ws = self._queue, self.ws
        count = self.metrics.frame_out  # a dict increment per frame, no lock
        try:
            while not self.closing:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame = queue.popleft()
                self._queued_chars -= len(frame)
                if queue and type(frame) is DeltaFrame:
                    frame, taken = take_merged_delta(frame, queue)
                    self._queued_chars -= taken
                await ws.send(frame)
                self.frames_out += 1
                count(frame)
        except ConnectionClosed:
            pass

    async def serve(self) -> None:
        CONNECTION.set(self.id)  # every line logged while handling this client names it
        writer = asyncio.create_task(self.write_loop(), name=f"writer:{self.id}")
        try:
            async for raw in self.ws:
                if self.closing:
                    break
                await self.dispatch(raw)
        except ConnectionClosed:
            pass
        finally:
            self.closing = True
            self.hub.drop(self)
            self._wakeup.set()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def dispatch(self, raw: str | bytes) -> None:
        request_id: str | None = None
        conversation_id: str | None = None
        self.frames_in += 1
        metrics = self.metrics
        if not self._bucket.take():
            metrics.frame_in(RATE_LIMITED)
            self._strikes += 1
            if self._strikes >= self.settings.rate_strikes:
                self.close(CloseCode.POLICY_VIOLATION, "flood: too many frames")
            else:
                self.send_error(RateLimited("too many frames; slow down"), request_id_of(raw), None)
            return
        self._strikes = 0
        try:
            try:
                frame = parse_frame(raw, max_message_chars=self.settings.max_message_chars)
            except CortexError:
                metrics.frame_in(INVALID)
                raise
            metrics.frame_in(frame.type)
            request_id = frame.request_id
            conversation_id = getattr(frame, "conversation_id", None)
            request_var = REQUEST.set(request_id)
            conversation_var = CONVERSATION.set(conversation_id)
            try:
                await self.dispatch_table(frame, self)
            finally:
                REQUEST.reset(request_var)
                CONVERSATION.reset(conversation_var)
        except CortexError as exc:
            if request_id is None:
                request_id = request_id_of(raw)
            event(log, "frame error", logging.DEBUG, code=exc.code, req=request_id)
            self.send_error(exc, request_id, conversation_id)
        except Exception:
            log.exception("frame handling failed (connection %s)", self.id)
            self.send_error(Internal("internal error"), request_id, conversation_id)

    def send_error(
        self, exc: CortexError, request_id: str | None, conversation_id: str | None
    ) -> None:
        self.deliver(
            ErrorEvent(
                code=exc.code,
                message=exc.message,
                request_id=request_id,
                conversation_id=conversation_id,
            ).encode()
        )
