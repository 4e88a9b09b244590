"""The boundary with LiteLLM: its import, its stream objects and its exceptions.

LiteLLM's exceptions become `ProviderError` / `ProviderTimeout` here, by type, the way httpx
maps httpcore's; nothing else in Cortex sees a LiteLLM object.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from types import ModuleType
from typing import Any

from ..errors import ProviderError, ProviderTimeout


def load_litellm(*, remote_cost_map: bool = False) -> ModuleType:
    """Import LiteLLM once, offline-friendly, with its per-call logging turned down."""
    if not remote_cost_map:
        # Without this LiteLLM fetches its cost map over the network at import time.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = importlib.import_module("litellm")
    litellm.suppress_debug_info = True  # type: ignore[attr-defined]  # untyped module
    # A parameter a model does not take (temperature on some) is dropped, not an error.
    litellm.drop_params = True  # type: ignore[attr-defined]
    return litellm


class ChunkWindow(list[Any]):
    """A stand-in for LiteLLM's per-stream chunk list that keeps only what it reads back.

    LiteLLM appends every chunk of a stream (about 5-6 KB each) to `CustomStreamWrapper.chunks`
    and offers no switch to stop it: a 10,000-token reply held ~90 MB until it ended. It reads
    the list back for the last two chunks (repetition check) and, at the end, for usage and the
    assembled response it logs. Cortex keeps the text itself and reads usage from the chunks
    that carry it, so the window keeps the newest `size` chunks plus every chunk with usage.
    """

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size

    def append(self, chunk: Any) -> None:
        super().append(chunk)
        if len(self) > 2 * self.size:
            recent = self[-self.size :]
            kept = [c for c in self[: -self.size] if getattr(c, "usage", None) is not None]
            self[:] = kept + recent


def bound_chunk_history(response: Any) -> None:
    chunks = getattr(response, "chunks", None)
    if isinstance(chunks, list) and not chunks:
        response.chunks = ChunkWindow()


def merge_tool_call(calls: dict[int, list[str]], fragment: Any) -> None:
    index = getattr(fragment, "index", None)
    index = len(calls) if index is None else int(index)
    entry = calls.setdefault(index, ["", "", ""])
    if getattr(fragment, "id", None):
        entry[0] = fragment.id
    function = getattr(fragment, "function", None)
    if function is not None:
        if getattr(function, "name", None):
            entry[1] = function.name
        if getattr(function, "arguments", None):
            entry[2] += function.arguments


def merge_tool_call_dict(calls: dict[int, list[str]], fragment: dict[str, Any]) -> None:
    """`merge_tool_call` for a fragment decoded from the SSE (a dict, no SDK object)."""
    index = fragment.get("index")
    index = len(calls) if index is None else int(index)
    entry = calls.setdefault(index, ["", "", ""])
    if fragment.get("id"):
        entry[0] = fragment["id"]
    function = fragment.get("function")
    if function:
        if function.get("name"):
            entry[1] = function["name"]
        if function.get("arguments"):
            entry[2] += function["arguments"]


async def close_stream(response: Any) -> None:
    """Close the provider stream so a cancelled or failed reply frees its connection."""
    for name in ("aclose", "close"):
        closer = getattr(response, name, None)
        if closer is None:
            continue
        try:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
        except Exception:  # closing is best effort; the reply is already decided
            pass
        return


def map_error(exc: Exception) -> ProviderError:
    """One of LiteLLM's exceptions (or a timeout) as Cortex's provider error, by type."""
    errors = importlib.import_module("litellm.exceptions")  # loaded already: LiteLLM raised it
    openai = importlib.import_module("openai")
    name = type(exc).__name__
    if isinstance(exc, errors.Timeout | openai.APITimeoutError | TimeoutError):
        return ProviderTimeout(f"the model provider timed out ({name})")
    if isinstance(exc, errors.MidStreamFallbackError):
        # A stream that broke after it started (a cut connection), after LiteLLM's fallbacks.
        cause = getattr(exc, "original_exception", None) or exc
        return ProviderError(f"the provider stream broke off: {type(cause).__name__}")
    status = getattr(exc, "status_code", None)
    text = str(getattr(exc, "message", "") or exc) or name
    text = " ".join(text.split())[:300]
    prefix = f"{name} {status}" if isinstance(status, int) else name
    return ProviderError(f"{prefix}: {text}")
