"""Reply leases: one reply at a time per conversation across every process.

A lease is a Redis lock with a time-to-live that its holder renews while it answers; a process
that dies stops renewing, the lease expires, and another process takes the conversation over.
One process alone needs none: its router already runs one worker per conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

log = logging.getLogger("cortex.leases")

LEASE_PREFIX = "cortex:lease:"


class Lease:
    """A held lease: renewed in the background until released or lost."""

    def __init__(self, lock: Lock, conversation_id: str, every: float) -> None:
        self.conversation_id = conversation_id
        self.lost = False
        self.on_lost: Callable[[], None] | None = None
        self._lock = lock
        self._renewer = asyncio.create_task(self._renew(every), name=f"lease:{conversation_id}")

    async def _renew(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self._lock.reacquire()  # back to the full time-to-live, if still ours
            except LockError:
                # Expired and maybe taken by another process: stop answering at once.
                log.error("lost the reply lease of conversation %s", self.conversation_id)
                self.lost = True
                if self.on_lost is not None:
                    self.on_lost()
                return
            except (RedisError, OSError) as exc:
                # Redis is away: nobody else can take the lease meanwhile; keep trying.
                log.warning("could not renew the lease of %s: %s", self.conversation_id, exc)

    async def release(self) -> None:
        self._renewer.cancel()
        await asyncio.gather(self._renewer, return_exceptions=True)
        if self.lost:
            return
        with contextlib.suppress(LockError, RedisError, OSError):
            await self._lock.release()  # if Redis is away, the lease expires on its own


class RedisLeases:
    """Leases over the Redis of `CORTEX_REDIS_URL`."""

    def __init__(self, redis: Redis, *, ttl: float) -> None:
        self._redis = redis
        self._ttl = ttl

    async def acquire(self, conversation_id: str) -> Lease | None:
        """The conversation's lease, or None if another process holds it or Redis is away."""
        lock = self._redis.lock(
            LEASE_PREFIX + conversation_id, timeout=self._ttl, blocking=False, thread_local=False
        )
        try:
            if not await lock.acquire():
                return None
        except (RedisError, OSError) as exc:
            log.warning("could not take the lease of %s: %s", conversation_id, exc)
            return None
        return Lease(lock, conversation_id, self._ttl / 3)

    async def held(self, conversation_id: str) -> bool:
        """Whether some process is answering in the conversation now."""
        try:
            return bool(await self._redis.exists(LEASE_PREFIX + conversation_id))
        except (RedisError, OSError):
            return False
