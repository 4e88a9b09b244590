"""A stall timer that counts the provider's silence, not the event loop's lag.

A stream ends when its provider sends nothing for `CORTEX_STREAM_IDLE_TIMEOUT` seconds. A plain
timeout on the wait for the next chunk also counts the time a chunk spends waiting for a busy
loop: when a long stretch of other work ends past the deadline, the timer and the socket's data
are handled in the same pass, and the timer cancels a read that had in fact succeeded.

So at the deadline this timer looks at what the streaming task awaits. If that already has its
result (the chunk is in; the task waits for its turn on the loop), the provider is not silent.
If not, the loop polls its sockets once more (data that came during a long callback is read
there) and the timer looks again. Only a read still pending then is a stall.
"""

from __future__ import annotations

import asyncio
from typing import Any

# How long after the deadline the second look comes (the loop polls its sockets in between),
# and how often a task whose chunk is in is looked at until it runs.
LOOK_AGAIN_S = 0.01
_UNKNOWN: Any = object()  # a task without asyncio's `_fut_waiter`: the plain timeout


class SilenceTimer:
    """Ends the `asyncio.timeout` scope it is given when the provider has been silent too long.

    One timer per stream, not one per chunk (arming a loop timer for every chunk was a few %
    of a busy server's CPU): `arm` and `disarm` only note the time and a count, and the timer,
    when it fires early, moves itself to the current wait's deadline.
    """

    def __init__(self, scope: asyncio.Timeout, idle: float) -> None:
        self._scope = scope
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._handle: asyncio.TimerHandle | None = None
        self._waiting = False
        self._waits = 0  # which wait the timer is looking at
        self._armed_at = 0.0

    def arm(self) -> None:
        """The stream waits for its next chunk: start counting."""
        self._armed_at = self._loop.time()
        self._waiting = True
        self._waits += 1
        if self._handle is None:
            self._handle = self._loop.call_at(self._armed_at + self._idle, self._due)

    def disarm(self) -> None:
        """A chunk came."""
        self._waiting = False

    def stop(self) -> None:
        """The stream is over."""
        self._waiting = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _due(self) -> None:
        self._handle = None
        if not self._waiting:
            return  # the next `arm` sets the timer again
        deadline = self._armed_at + self._idle
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._due)
        else:
            self._look(False, self._waits)

    def _look(self, pending_before: bool, wait: int) -> None:
        self._handle = None
        if not self._waiting or wait != self._waits:
            self._due()  # a chunk came meanwhile: count the wait after it
            return
        # asyncio's tasks (Python and C, on asyncio's loop and uvloop) keep the future they
        # await in `_fut_waiter`; None while the task is scheduled to run.
        waiter: asyncio.Future[object] | None = getattr(self._task, "_fut_waiter", _UNKNOWN)
        if waiter is _UNKNOWN:
            self._expire()
        elif waiter is None or waiter.done():
            self._handle = self._loop.call_later(LOOK_AGAIN_S, self._look, False, wait)
        elif not pending_before:
            self._handle = self._loop.call_later(LOOK_AGAIN_S, self._look, True, wait)
        else:
            self._expire()

    def _expire(self) -> None:
        self._handle = None
        self._scope.reschedule(self._loop.time())
