"""LlmService: model calls, through LiteLLM or, for OpenAI-format streams, the direct path.

`stream()` yields typed events (`TextDelta`, `ToolCalls`, `UsageInfo`, `Finish`); LiteLLM's
objects and exceptions are turned into Cortex's in `boundary`. A streamed call whose models all
speak OpenAI's SSE takes the direct path (`direct`: LiteLLM builds the request, Cortex reads the
stream) unless `CORTEX_LLM_FAST_PATH` is off; the same rules apply around it as LiteLLM applies
(retries before the first token, fallbacks, one first-response deadline, the stall timer). The
built-in mock model uses LiteLLM's own `mock_response`, so it takes LiteLLM's streaming path.

Past 400 lines because the retry, fallback and deadline rules are one job on both paths: kept
in one module, the two paths cannot drift apart (tests run the LLM suites on each).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from ..config import MOCK_MODEL, Settings
from ..errors import CortexError, ProviderError, ProviderTimeout
from .boundary import (
    bound_chunk_history,
    close_stream,
    load_litellm,
    map_error,
    merge_tool_call,
    merge_tool_call_dict,
)
from .direct import (
    DirectClient,
    DirectRequest,
    RetryableStatus,
    SseDecoder,
    backoff,
    build_request,
)
from .events import (
    Completion,
    Finish,
    Messages,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCalls,
    UsageInfo,
)
from .mock import MOCK_LITELLM_MODEL, mock_reply
from .silence import SilenceTimer
from .window import has_parts, trim_parts

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
        self._direct = DirectClient(self._litellm)
        # Models LiteLLM has no price for (local and self-hosted ones): asked once, since an
        # unpriced lookup costs the loop about a millisecond a reply.
        self._unpriced: set[str] = set()

    def default_model(self) -> str:
        return self.settings.model()

    async def aclose(self) -> None:
        """Close the direct path's pooled connections."""
        await self._direct.close()

    def path_for(self, model: str | None = None) -> str:
        """Which path a streamed reply of `model` takes: "direct" or "litellm" (for doctor)."""
        kwargs = self._kwargs([{"role": "user", "content": "."}], model, None, None, None, None)
        return "direct" if self._direct_requests(kwargs) else "litellm"

    def _direct_requests(self, kwargs: dict[str, Any]) -> list[DirectRequest] | None:
        """The direct requests for the model and each fallback, or None when one of them is
        not an OpenAI-format stream (then LiteLLM does the whole call, fallbacks included)."""
        if not self.settings.llm_fast_path or "mock_response" in kwargs:
            return None
        requests: list[DirectRequest] = []
        for model in [kwargs["model"], *kwargs.get("fallbacks", ())]:
            request = build_request(
                self._litellm,
                model,
                kwargs["messages"],
                api_base=kwargs.get("api_base"),
                api_key=kwargs.get("api_key"),
                temperature=kwargs.get("temperature"),
                max_tokens=kwargs.get("max_tokens"),
                tools=kwargs.get("tools"),
            )
            if request is None:
                return None
            requests.append(request)
        return requests

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
            kwargs.update(model=MOCK_LITELLM_MODEL, mock_response=mock_reply(full))
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

    def stream(
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
        requests = self._direct_requests(kwargs)
        return self._stream_direct(requests) if requests else self._stream_litellm(kwargs)

    async def _stream_litellm(self, kwargs: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        kwargs.update(stream=True, stream_options={"include_usage": True})
        model_name = kwargs["model"]
        idle = self.settings.stream_idle_timeout
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        finish: str | None = None
        usage: Any = None
        response: Any = None
        silence: SilenceTimer | None = None
        try:
            # One deadline for the provider to start answering, LiteLLM's retries and
            # fallbacks included (each attempt also has it as its own timeout).
            async with asyncio.timeout(self.settings.llm_timeout) as first:
                response = await self._litellm.acompletion(**kwargs)
            bound_chunk_history(response)
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
                            merge_tool_call(calls, call)
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
            raise map_error(exc) from exc
        finally:
            if silence is not None:
                silence.stop()
            if response is not None:
                await close_stream(response)
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

    async def _open(self, requests: list[DirectRequest]) -> tuple[Any, DirectRequest]:
        """The first request to answer: each model in turn (the fallbacks after the model),
        each retried on the statuses LiteLLM retries, before any token has come."""
        error: CortexError | None = None
        for request in requests:
            for attempt in range(self.settings.num_retries + 1):
                try:
                    return await self._direct.open(request), request
                except RetryableStatus as exc:
                    error = exc.error
                    if attempt < self.settings.num_retries:
                        await backoff(attempt, exc.wait_s)
                except CortexError as exc:
                    error = exc
                    break  # not retried: the next fallback
        assert error is not None  # requests is never empty
        raise error

    async def _stream_direct(
        self, requests: list[DirectRequest]
    ) -> AsyncGenerator[StreamEvent, None]:
        """The same turn as `_stream_litellm`, from the provider's SSE decoded once per event."""
        idle = self.settings.stream_idle_timeout
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        finish: str | None = None
        usage: dict[str, Any] | None = None
        response: Any = None
        silence: SilenceTimer | None = None
        request = requests[0]
        try:
            async with asyncio.timeout(self.settings.llm_timeout) as first:
                response, request = await self._open(requests)
            async with asyncio.timeout(None) as stall_scope:
                silence = SilenceTimer(stall_scope, idle)
                decoder = SseDecoder()
                read = response.content.readany
                while True:
                    silence.arm()
                    try:
                        data = await read()
                    finally:
                        silence.disarm()
                    if not data:
                        break
                    for event in decoder.feed(data):
                        if event.get("usage"):
                            usage = event["usage"]
                        choices = event.get("choices")
                        if not choices:
                            continue
                        choice = choices[0]
                        delta = choice.get("delta")
                        if delta:
                            text = delta.get("content")
                            if text:
                                yield TextDelta(text)
                            for call in delta.get("tool_calls") or ():
                                merge_tool_call_dict(calls, call)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                    if decoder.error is not None:
                        raise decoder.error
        except TimeoutError as exc:
            raise ProviderTimeout(
                "the model did not answer in time"
                if response is None or first.expired()
                else f"the model stalled for more than {idle:g} s"
            ) from exc
        except CortexError:
            raise
        except Exception as exc:  # a cut connection, a line past aiohttp's limit
            raise ProviderError(f"the provider stream broke off: {type(exc).__name__}") from exc
        finally:
            if silence is not None:
                silence.stop()
            if response is not None:
                response.close()  # a no-op once read to the end (the connection is pooled)
        if calls:
            yield ToolCalls(
                tuple(
                    ToolCall(id=c[0] or f"call_{i}", name=c[1], arguments=c[2] or "{}")
                    for i, c in sorted(calls.items())
                )
            )
        if usage is not None:
            yield self._priced(
                request.model, usage.get("prompt_tokens"), usage.get("completion_tokens")
            )
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
            async with asyncio.timeout(self.settings.llm_timeout):  # retries included
                response = await self._litellm.acompletion(**kwargs)
        except Exception as exc:
            raise map_error(exc) from exc
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
        return self._priced(model, prompt, completion)

    def _priced(self, model: str, prompt: int | None, completion: int | None) -> UsageInfo:
        """Usage with its cost from `litellm.cost_per_token`."""
        cost: float | None = None
        if prompt is not None and completion is not None and model not in self._unpriced:
            try:
                prompt_cost, completion_cost = self._litellm.cost_per_token(
                    model=model, prompt_tokens=prompt, completion_tokens=completion
                )
                cost = float(prompt_cost + completion_cost)
            except Exception:  # an unpriced model (local, fake, mock) has no cost
                if len(self._unpriced) < 1024:
                    self._unpriced.add(model)
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
        if isinstance(window, int) and has_parts(messages):  # attachments: LiteLLM's trim fails
            return trim_parts(self._litellm, messages, chosen, int(window * TRIM_RATIO))
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
