"""Flood control for one connection: frames and bytes a second, and when to give up on it.

No I/O here: `FloodControl.admit()` says whether a frame may be read, and whether the
connection has earned a close. A refused frame is refused unread: it costs a clock reading
and two subtractions, never a JSON parse.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class Verdict(enum.Enum):
    ADMIT = "admit"
    REFUSE = "refuse"  # answered with a `rate_limited` error
    CLOSE = "close"  # closed with 1008: it stayed over the limit


class Bucket:
    """`rate` units a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def half_full(self) -> bool:
        return self.level * 2 >= self.burst


class FloodControl:
    """Frames and bytes a connection may send; a client that keeps over the limit is closed.

    A frame is admitted when both buckets have room for it (one frame, its size in bytes; a
    frame bigger than the byte burst is admitted from a full bucket, then the bucket is in
    debt). Refused frames count as strikes until the client has slowed down (both buckets
    half full again); `strikes` of them in a row, allowed frames in between included, close it.
    """

    def __init__(
        self,
        *,
        frames_per_s: float,
        frame_burst: int,
        bytes_per_s: float,
        byte_burst: int,
        strikes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        now = clock()
        self.frames = Bucket(frames_per_s, float(frame_burst), now)
        self.bytes = Bucket(bytes_per_s, float(byte_burst), now)
        self.strikes_allowed = strikes
        self.strikes = 0
        self.clock = clock

    def admit(self, size: int) -> Verdict:
        now = self.clock()
        frames, data = self.frames, self.bytes
        frames.refill(now)
        data.refill(now)
        if frames.level >= 1 and (data.level >= size or data.level >= data.burst):
            if self.strikes and frames.half_full() and data.half_full():
                self.strikes = 0  # it slowed down
            frames.level -= 1
            data.level -= size
            return Verdict.ADMIT
        self.strikes += 1
        return Verdict.CLOSE if self.strikes >= self.strikes_allowed else Verdict.REFUSE
