"""LlmService: every model call goes through `litellm.acompletion`, streaming or not.

`stream()` yields typed events (`TextDelta`, `ToolCalls`, `UsageInfo`, `Finish`); LiteLLM's
exceptions become `ProviderError` / `ProviderTimeout` here and nowhere else. The built-in mock
model uses LiteLLM's own `mock_response`, so it takes the same streaming path as a provider.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from .config import MOCK_MODEL, Settings
from .errors import CortexError, ProviderError, ProviderTimeout
from .silence import SilenceTimer

Messages = Sequence[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, as the model wrote it

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """Every tool call of one model turn, assembled from the streamed fragments."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class UsageInfo:
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str | None


StreamEvent = TextDelta | ToolCalls | UsageInfo | Finish


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) answer."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: UsageInfo | None = None
    finish_reason: str | None = None


class LlmBackend(Protocol):
    """What the Router needs of a model service; a scripted fake implements it for unit tests."""

    def stream(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamEvent]: ...

    def default_model(self) -> str: ...


# The share of a model's input window a trimmed history may fill (LiteLLM's default ratio).
TRIM_RATIO = 0.75
# More than any tokenizer spends on one message's role and separators, or on priming the reply.
_TOKENS_PER_MESSAGE = 16


def _most_tokens(messages: Messages) -> int:
    """An upper bound of the messages' tokens: every token covers at least one UTF-8 byte."""
    total = _TOKENS_PER_MESSAGE
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for key in ("content", "tool_calls", "name", "tool_call_id"):
            value = message.get(key)
            if value:
                text = value if isinstance(value, str) else json.dumps(value)
                total += len(text.encode())
    return total


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


def mock_reply(messages: Messages) -> str:
    """The mock model's deterministic answer to the last user message."""
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    said = " ".join(str(last or "").split())
    if len(said) > 200:
        said = said[:199] + "…"
    return (
        f'You said: "{said}". I am Cortex\'s built-in mock model: no provider key is set, so no '
        "real model was called. Set CORTEX_DEFAULT_MODEL and your provider's API key "
        "(for example OPENAI_API_KEY) to talk to a real model."
    )


# The seed design's config keys, and the settings they stand for.
_SEED_KEYS = {"default_model": "default_model", "use_mock": "use_mock", "timeout": "llm_timeout"}


def settings_from(config: Settings | Mapping[str, Any] | None) -> Settings:
    """`Settings` from what `LlmService` accepts: `Settings`, the seed's dict, or `None`.

    A dict takes the seed's keys (`default_model`, `use_mock`, `timeout`) and any `Settings`
    field by name; what it leaves out comes from the environment, as for `Settings()`.
    """
    if isinstance(config, Settings):
        return config
    if config is None:
        return Settings()
    values: dict[str, Any] = {}
    for key, value in config.items():
        name = _SEED_KEYS.get(key, key)
        if name not in Settings.model_fields:
            raise ValueError(f"LlmService config: unknown key {key!r}")
        values[name] = value
    return Settings(**values)


class LlmService:
    """Model calls through LiteLLM.

    Cortex builds it from its `Settings`; callers written against the seed design may pass the
    seed's dict (`{"default_model": ..., "use_mock": ..., "timeout": ...}`) or nothing.
    """

    def __init__(self, config: Settings | Mapping[str, Any] | None = None) -> None:
        settings = settings_from(config)
        self.settings = settings
        self._litellm = load_litellm(remote_cost_map=settings.litellm_remote_cost_map)

    def default_model(self) -> str:
        return self.settings.model()

    def _kwargs(
        self,
        messages: Messages,
        model: str | None,
        temperature: float | None,
        max_tokens: int | None,
        system_prompt: str | None,
        tools: Sequence[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        s = self.settings
        chosen = model or self.default_model()
        full = list(messages)
        if system_prompt:
            full.insert(0, {"role": "system", "content": system_prompt})
        kwargs: dict[str, Any] = {"messages": full, "timeout": s.llm_timeout}
        if chosen == MOCK_MODEL:
            kwargs.update(model="openai/cortex-mock", mock_response=mock_reply(full))
        else:
            kwargs.update(model=chosen, num_retries=s.num_retries)
            if s.llm_api_base:
                kwargs["api_base"] = s.llm_api_base
            if s.llm_api_key:
                kwargs["api_key"] = s.llm_api_key
            if s.fallback_models:
                kwargs["fallbacks"] = list(s.fallback_models)
        temperature = s.temperature if temperature is None else temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        max_tokens = s.max_tokens if max_tokens is None else max_tokens
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if tools:
            kwargs["tools"] = list(tools)
        return kwargs

    async def stream(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream one model turn: text deltas, then tool calls, usage and the finish reason."""
        kwargs = self._kwargs(messages, model, temperature, max_tokens, system_prompt, tools)
        kwargs.update(stream=True, stream_options={"include_usage": True})
        model_name = kwargs["model"]
        idle = self.settings.stream_idle_timeout
        loop = asyncio.get_running_loop()
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        finish: str | None = None
        usage: Any = None
        response: Any = None
        try:
            async with asyncio.timeout(loop.time() + self.settings.llm_timeout) as first:
                response = await self._litellm.acompletion(**kwargs)
            _bound_chunk_history(response)
            # Only the wait for the next chunk is timed: a stall between chunks ends the reply.
            async with asyncio.timeout(None) as stall_scope:
                silence = SilenceTimer(stall_scope, idle)
                iterator = response.__aiter__()
                while True:
                    silence.arm()
                    try:
                        chunk = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        silence.disarm()
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta is not None:
                        text = delta.content
                        if text:
                            yield TextDelta(text)
                        for call in delta.tool_calls or ():
                            _merge_tool_call(calls, call)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except TimeoutError as exc:
            raise ProviderTimeout(
                "the model did not answer in time"
                if response is None or first.expired()
                else f"the model stalled for more than {idle:g} s"
            ) from exc
        except CortexError:
            raise
        except Exception as exc:
            raise _map_error(exc) from exc
        finally:
            if response is not None:
                await _close(response)
        if calls:
            yield ToolCalls(
                tuple(
                    ToolCall(id=c[0] or f"call_{i}", name=c[1], arguments=c[2] or "{}")
                    for i, c in sorted(calls.items())
                )
            )
        if usage is not None:
            yield self._usage(model_name, usage)
        yield Finish(finish)

    async def complete(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        """One whole answer (no streaming), with its tool calls and usage."""
        kwargs = self._kwargs(messages, model, temperature, max_tokens, system_prompt, tools)
        try:
            response = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            raise _map_error(exc) from exc
        choice = response.choices[0]
        message = choice.message
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "{}")
            for c in (getattr(message, "tool_calls", None) or ())
        ]
        usage = getattr(response, "usage", None)
        return Completion(
            text=message.content or "",
            tool_calls=calls,
            usage=self._usage(kwargs["model"], usage) if usage is not None else None,
            finish_reason=choice.finish_reason,
        )

    def _usage(self, model: str, usage: Any) -> UsageInfo:
        prompt = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        cost: float | None = None
        if prompt is not None and completion is not None:
            try:
                prompt_cost, completion_cost = self._litellm.cost_per_token(
                    model=model, prompt_tokens=prompt, completion_tokens=completion
                )
                cost = float(prompt_cost + completion_cost)
            except Exception:  # an unpriced model (local, fake, mock) has no cost
                cost = None
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost)

    def trim(self, messages: list[dict[str, Any]], model: str | None) -> list[dict[str, Any]]:
        """Trim the oldest history to the model's context window (LiteLLM's token counting).

        Counting tokens costs the event loop about 4.5 ms per 50 KB of history on every reply,
        so a history whose bytes alone prove it fits is not counted (a token is never shorter
        than one byte): only conversations near the window pay for LiteLLM's count.
        """
        chosen = model or self.default_model()
        if chosen == MOCK_MODEL or chosen not in self._litellm.model_cost:
            return messages
        window = self._litellm.model_cost[chosen].get("max_input_tokens")
        if isinstance(window, int) and _most_tokens(messages) < window * TRIM_RATIO:
            return messages
        try:
            trimmed = self._litellm.utils.trim_messages(
                messages, model=chosen, trim_ratio=TRIM_RATIO
            )
        except Exception:
            return messages
        return list(trimmed) if isinstance(trimmed, list) else messages

    # ---- the seed design's interface, kept for callers written against it ---------------

    async def get_completion(
        self,
        prompt: str,
        system_prompt: str | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        model: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Seed interface: one prompt in, the answer text out (errors raise, never return)."""
        result = await self.complete(
            [{"role": "user", "content": prompt}],
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            system_prompt=system_prompt,
            tools=tools,
        )
        return result.text

    async def get_streaming_completion(
        self,
        prompt: str,
        system_prompt: str | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        model: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[str, None]:
        """Seed interface: the answer as text chunks."""
        async for event in self.stream(
            [{"role": "user", "content": prompt}],
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            system_prompt=system_prompt,
            tools=tools,
        ):
            if isinstance(event, TextDelta):
                yield event.text


_shared_service: LlmService | None = None


def get_llm_service(config: Settings | Mapping[str, Any] | None = None) -> LlmService:
    """The seed design's accessor: one shared `LlmService`, rebuilt when a config is given.

    Kept for scripts written against the seed. Cortex's server never calls it: it builds its
    service from its settings and passes it down.
    """
    global _shared_service
    if _shared_service is None or config is not None:
        _shared_service = LlmService(config)
    return _shared_service


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


def _bound_chunk_history(response: Any) -> None:
    chunks = getattr(response, "chunks", None)
    if isinstance(chunks, list) and not chunks:
        response.chunks = ChunkWindow()


def _merge_tool_call(calls: dict[int, list[str]], fragment: Any) -> None:
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


async def _close(response: Any) -> None:
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


def _map_error(exc: Exception) -> ProviderError:
    """LiteLLM's exception zoo, mapped to Cortex's two provider errors."""
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if "Timeout" in name or isinstance(exc, TimeoutError):
        return ProviderTimeout(f"the model provider timed out ({name})")
    if name == "MidStreamFallbackError":
        # LiteLLM's name for a stream that broke after it started (a cut connection).
        cause = getattr(exc, "original_exception", None) or exc
        return ProviderError(f"the provider stream broke off: {type(cause).__name__}")
    text = str(getattr(exc, "message", "") or exc) or name
    text = " ".join(text.split())[:300]
    prefix = f"{name} {status}" if isinstance(status, int) else name
    return ProviderError(f"{prefix}: {text}")


def parse_arguments(arguments: str) -> Any:
    """A tool call's arguments as JSON if they parse, else the raw text (for display)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
