"""The WebSocket side: one `Connection` per client, frames in, encoded events out.

The hub and the router only ever `deliver()` to a connection, which never blocks: a frame is
written at once when nothing waits before it and the socket takes it, else it joins a bounded
queue drained by the connection's writer task. A client that stops reading fills its
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
from websockets.protocol import State

from ..config import Settings
from ..errors import BadFrame, CortexError, Internal, ProtocolError, RateLimited
from ..fanout.hub import Hub
from ..ops.logs import CONNECTION, CONVERSATION, REQUEST, event
from ..ops.metrics import INVALID, RATE_LIMITED, Metrics
from ..pipeline.files import Files
from ..protocol import (
    DeltaFrame,
    ErrorEvent,
    delta_frame,
    parse_frame,
    request_id_of,
    take_merged_delta,
)
from .dispatch import DispatchTable
from .flood import FloodControl, Verdict
from .uploads import UploadSlot

log = logging.getLogger("cortex.server")
_ids = itertools.count(1)


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
        files: Files | None = None,
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
        # Deltas below these offsets are already with the client (see `trim_below`).
        self._floors: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._drained: asyncio.Event | None = None  # made by the first catch-up that waits
        self._max_frames = s.send_queue_max
        self._max_chars = s.send_buffer_bytes
        self._flood = FloodControl(
            frames_per_s=s.rate_per_s,
            frame_burst=s.rate_burst,
            bytes_per_s=s.rate_bytes_per_s,
            byte_burst=s.rate_bytes_burst,
            strikes=s.rate_strikes,
        )
        self.uploads = UploadSlot(files, owner, deliver=self.deliver, close=self.close)
        self.closing = False
        self.opened = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0
        self._writing = False  # the writer task is inside ws.send()
        self._count = metrics.frame_out  # a dict increment per frame, no lock

    def deliver(self, frame: str) -> None:
        if self.closing:
            return
        if self._floors and isinstance(frame, DeltaFrame) and frame.message_id in self._floors:
            trimmed = self._above_floor(frame)
            if trimmed is None:
                return
            frame = trimmed
        queue = self._queue
        # What waits behind the oldest unsent frame: one large frame (a long stored message)
        # is not a slow reader, only a backlog behind it that keeps growing is.
        if queue and (
            len(queue) >= self._max_frames or self._queued_chars - len(queue[0]) > self._max_chars
        ):
            # The client does not read what it is sent: drop it rather than buffer forever.
            self.close(CloseCode.TRY_AGAIN_LATER, "slow reader: too many unsent events")
            return
        if not queue and not self._writing and self._write_now(frame):
            return
        queue.append(frame)
        self._queued_chars += len(frame)
        self._wakeup.set()
        if self._drained is not None and self._queued_chars > self._max_chars // 2:
            self._drained.clear()

    def _write_now(self, frame: str) -> bool:
        """Write the frame to the socket at once when nothing waits before it and the socket
        takes it without waiting (False: queue it for the writer task).

        This is what `ws.send()` does when it need not wait, through websockets' Sans-I/O
        protocol, without a task switch and an async context per frame: the per-frame cost
        of a streaming reply (bench/capacity.py).
        """
        ws = self.ws
        if ws.protocol.state is not State.OPEN or ws.paused or ws.send_in_progress is not None:
            return False
        try:
            ws.protocol.send_text(frame.encode())
            ws.send_data()
        except Exception:  # the socket is gone: websockets sees it close, the reader ends
            log.debug("direct write failed (connection %s)", self.id, exc_info=True)
            self.close(CloseCode.INTERNAL_ERROR, "write failed")
            return True
        self.frames_out += 1
        self._count(frame)
        return True

    def trim_below(self, message_id: str, offset: int) -> None:
        """The client has the reply's text up to `offset` (a catch-up read it, maybe from the
        process making the reply): later deltas below it are dropped or cut, whenever they
        arrive, so offsets stay exact with no overlap. 0 forgets the message's floor (the
        client is handed the text from the start again)."""
        self._floors.pop(message_id, None)
        if offset > 0:
            if len(self._floors) >= 64:  # replies that ended before a delta came: forget them
                del self._floors[next(iter(self._floors))]
            self._floors[message_id] = offset

    def _above_floor(self, frame: DeltaFrame) -> DeltaFrame | None:
        floor = self._floors[frame.message_id]
        if frame.offset + len(frame.text) <= floor:
            return None
        del self._floors[frame.message_id]  # deltas come in order: the rest are past it
        if frame.offset >= floor:
            return frame
        cut = floor - frame.offset
        return delta_frame(frame.conversation_id, frame.message_id, floor, frame.text[cut:])

    async def room(self) -> None:
        """Return once at most half the send budget is queued (a catch-up paces itself by it,
        so that catching up on many long messages never makes this client a slow reader)."""
        if self._queued_chars <= self._max_chars // 2 or self.closing:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        self._drained.clear()
        await self._drained.wait()

    def close(self, code: int, reason: str) -> None:
        """Close without waiting (called from deliver(), which must not block)."""
        if self.closing:
            return
        self.closing = True
        if self._drained is not None:
            self._drained.set()  # a catch-up waiting for room goes on (and delivers nothing)
        self._queue.clear()
        self._wakeup.set()
        self.hub.drop(self)
        asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    async def write_loop(self) -> None:
        queue, ws, count = self._queue, self.ws, self._count
        try:
            while not self.closing:
                if not queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                frame = queue.popleft()
                self._queued_chars -= len(frame)
                if self._drained is not None and self._queued_chars <= self._max_chars // 2:
                    self._drained.set()
                if queue and type(frame) is DeltaFrame:
                    frame, taken = take_merged_delta(frame, queue)
                    self._queued_chars -= taken
                self._writing = True
                try:
                    await ws.send(frame)
                finally:
                    self._writing = False
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
            if self._drained is not None:
                self._drained.set()
            self.hub.drop(self)
            self._wakeup.set()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            try:
                await self.uploads.abort()  # a half-sent file leaves nothing behind
            except Exception:
                log.exception("could not drop an unfinished upload (the sweep will)")

    async def dispatch(self, raw: str | bytes) -> None:
        request_id: str | None = None
        conversation_id: str | None = None
        self.frames_in += 1
        if isinstance(raw, bytes):
            # An upload's bytes count against its own size, not the rate limits.
            await self.uploads.binary(raw)
            return
        metrics = self.metrics
        verdict = self._flood.admit(len(raw))
        if verdict is not Verdict.ADMIT:
            metrics.frame_in(RATE_LIMITED)
            if verdict is Verdict.CLOSE:
                self.close(CloseCode.POLICY_VIOLATION, "flood: too many frames or bytes")
            else:
                error = RateLimited("too many frames or bytes; slow down")
                self.send_error(error, request_id_of(raw), None)
            return
        try:
            try:
                frame = parse_frame(raw, max_message_chars=self.settings.max_message_chars)
            except CortexError:
                metrics.frame_in(INVALID)
                raise
            metrics.frame_in(frame.type)
            request_id = frame.request_id
            if self.uploads.busy and frame.type != "cancel_upload":
                raise BadFrame(
                    f"{frame.type} refused: an upload is in progress; send its bytes, "
                    "or cancel_upload"
                )
            conversation_id = getattr(frame, "conversation_id", None)
            request_var = REQUEST.set(request_id)
            conversation_var = CONVERSATION.set(conversation_id)
            try:
                await self.dispatch_table(frame, self)
            finally:
                REQUEST.reset(request_var)
                CONVERSATION.reset(conversation_var)
        except CortexError as exc:
            if request_id is None and isinstance(exc, ProtocolError):
                request_id = exc.request_id
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
