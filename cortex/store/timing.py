"""Latency of each `Store` call, for the database metric: two `perf_counter()` calls per call.

A store takes an optional observer `(operation, seconds) -> None`; without one the wrapper only
checks an attribute. The operation is the method's name, so the label set stays small and fixed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

Observer = Callable[[str, float], None]

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])


def timed(fn: F) -> F:
    """Report how long each call of an async store method took, failed calls included.

    The instance must have an `observe` attribute (an `Observer` or None).
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        observe: Observer | None = self.observe
        if observe is None:
            return await fn(self, *args, **kwargs)
        start = time.perf_counter()
        try:
            return await fn(self, *args, **kwargs)
        finally:
            observe(name, time.perf_counter() - start)

    return cast(F, wrapper)
