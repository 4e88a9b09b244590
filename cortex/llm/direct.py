"""The direct stream decoder: OpenAI-format SSE read on a pooled aiohttp session, orjson once.

LiteLLM turns every streamed chunk into OpenAI SDK objects and then its own (~400 µs per chunk
on this kind of machine); Cortex only needs the text, tool call fragments, usage and finish
reason. So for providers whose stream is OpenAI's chat-completions SSE, LiteLLM still decides
everything about the request (provider, key, base URL, headers, body: `get_llm_provider`,
`get_optional_params` and the provider config's `validate_environment` / `transform_request` /
`get_complete_url`), and Cortex reads the answer itself. Its HTTP errors go through LiteLLM's
own `exception_type`, so they become the same Cortex errors as on LiteLLM's path.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import aiohttp
import orjson

from ..errors import ProviderError
from .boundary import map_error

# Providers whose chat-completions stream is OpenAI's SSE format, answered by an
# `OpenAIGPTConfig` in LiteLLM. Any other provider (Anthropic's native API, Bedrock, Gemini,
# Azure with its api-version, ollama's own API...) stays on LiteLLM.
OPENAI_SSE_PROVIDERS = frozenset(
    {
        "openai",
        "custom_openai",
        "hosted_vllm",
        "openrouter",
        "groq",
        "deepseek",
        "together_ai",
        "lm_studio",
        "llamafile",
        "xai",
        "fireworks_ai",
        "deepinfra",
        "cerebras",
        "nvidia_nim",
    }
)


# The longest line of a stream (a tool call's arguments come in pieces; no event is this big).
MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DirectRequest:
    """One streamed chat-completions request, as LiteLLM would send it."""

    url: str
    headers: dict[str, str]
    body: bytes
    provider: str
    model: str  # as Cortex named it: priced by `litellm.cost_per_token`, named in errors


class RetryableStatus(ProviderError):
    """A status LiteLLM retries (408, 409, 429, 5xx), with the wait the provider asked for."""

    def __init__(self, error: ProviderError, wait_s: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait_s = wait_s


def build_request(
    litellm: ModuleType,
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None,
    api_key: str | None,
    temperature: float | None,
    max_tokens: int | None,
    tools: Sequence[dict[str, Any]] | None,
) -> DirectRequest | None:
    """The request LiteLLM would send for a streamed call, or None when the model's provider
    does not stream OpenAI's format (then LiteLLM does the whole call)."""
    try:
        listed = orjson.dumps(list(tools)) if tools else None
        options = _Options(model, api_base, api_key, temperature, max_tokens, listed)
        route = _route(litellm, options)
        return None if route is None else _request(route, model, messages)
    except Exception:  # an unknown provider, a parameter it refuses: LiteLLM's call reports it
        return None


@dataclass(frozen=True, slots=True)
class _Route:
    """What LiteLLM decides about a model's requests before it sees their messages."""

    name: str
    provider: str
    config: Any  # the provider's OpenAIGPTConfig
    base: str | None
    key: str | None
    optional: dict[str, Any]
    extra_body: dict[str, Any]
    url: str


# A reply asks LiteLLM for its route once per model and options, not on every request:
# resolving it costs the event loop about a millisecond a reply.
_ROUTES: dict[tuple[Any, ...], _Route | None] = {}
_ROUTES_MAX = 256


class _Options(NamedTuple):
    """What a model's route depends on (its tools as JSON, so that it can be a cache key)."""

    model: str
    api_base: str | None
    api_key: str | None
    temperature: float | None
    max_tokens: int | None
    tools: bytes | None


def _route(litellm: ModuleType, options: _Options) -> _Route | None:
    key = (id(litellm), options)
    if key in _ROUTES:
        return _ROUTES[key]
    route = _resolve(litellm, options)
    if len(_ROUTES) >= _ROUTES_MAX:
        del _ROUTES[next(iter(_ROUTES))]
    _ROUTES[key] = route
    return route


def _resolve(litellm: ModuleType, options: _Options) -> _Route | None:
    model, api_base, api_key = options.model, options.api_base, options.api_key
    name, provider, dynamic_key, dynamic_base = litellm.get_llm_provider(
        model=model, api_base=api_base, api_key=api_key
    )
    if provider not in OPENAI_SSE_PROVIDERS:
        return None
    utils = importlib.import_module("litellm.utils")
    types = importlib.import_module("litellm.types.utils")
    gpt = importlib.import_module("litellm.llms.openai.chat.gpt_transformation")
    config = utils.ProviderConfigManager.get_provider_chat_config(
        model=name, provider=types.LlmProviders(provider)
    )
    if not isinstance(config, gpt.OpenAIGPTConfig):
        return None
    base = api_base or dynamic_base
    key = api_key or dynamic_key
    if provider == "openai":
        base = gpt.OpenAIGPTConfig.get_api_base(base)
        key = gpt.OpenAIGPTConfig.get_api_key(key)
    optional = utils.get_optional_params(
        model=name,
        custom_llm_provider=provider,
        temperature=options.temperature,
        max_tokens=options.max_tokens,
        tools=orjson.loads(options.tools) if options.tools else None,
        stream=True,
        stream_options={"include_usage": True},
        drop_params=True,
    )
    extra_body = optional.pop("extra_body", None) or {}
    url = config.get_complete_url(
        api_base=base,
        api_key=key,
        model=name,
        optional_params=optional,
        litellm_params={"custom_llm_provider": provider, "api_base": base, "api_key": key},
        stream=True,
    )
    return _Route(name, provider, config, base, key, optional, extra_body, url)


def _request(route: _Route, model: str, messages: list[dict[str, Any]]) -> DirectRequest:
    """The request of one turn: its headers and body, by the provider's config."""
    name, base, key = route.name, route.base, route.key
    optional = dict(route.optional)
    litellm_params = {"custom_llm_provider": route.provider, "api_base": base, "api_key": key}
    headers = route.config.validate_environment(
        headers={},
        model=name,
        messages=messages,
        optional_params=optional,
        litellm_params=litellm_params,
        api_key=key,
        api_base=base,
    )
    body = route.config.transform_request(
        model=name,
        messages=messages,
        optional_params=optional,
        litellm_params=litellm_params,
        headers=headers,
    )
    body.update(route.extra_body)
    headers = {str(k): str(v) for k, v in headers.items()}
    headers.setdefault("Content-Type", "application/json")
    headers["Accept"] = "text/event-stream"
    return DirectRequest(route.url, headers, orjson.dumps(body), route.provider, model)


class DirectClient:
    """One pooled aiohttp session for every direct stream of a process."""

    def __init__(self, litellm: ModuleType) -> None:
        self._litellm = litellm
        self._session: aiohttp.ClientSession | None = None

    def _pool(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            # No pool limit: each stream holds its connection for the reply's length, and
            # the number of replies is bounded above (workers, the send rate).
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout())
            self._session = session
        return session

    async def open(self, request: DirectRequest) -> aiohttp.ClientResponse:
        """POST the request; an HTTP error becomes Cortex's error, as LiteLLM maps it."""
        try:
            response = await self._pool().post(
                request.url, data=request.body, headers=request.headers
            )
        except aiohttp.ClientError as exc:
            error = self._mapped(request, 500, str(exc) or type(exc).__name__)
            raise RetryableStatus(error, 0) from exc
        if response.status < 400:
            return response
        try:
            text = await response.text(errors="replace")
        except aiohttp.ClientError:
            text = ""
        finally:
            response.release()
        error = self._mapped(request, response.status, text, response.headers)
        utils = importlib.import_module("litellm.utils")
        if utils.should_retry(response.status):
            wait = _retry_after(response.headers.get("retry-after"))
            raise RetryableStatus(error, wait)
        raise error

    def _mapped(
        self, request: DirectRequest, status: int, text: str, headers: Any = None
    ) -> ProviderError:
        """LiteLLM's exception for this status (its `exception_type`), as Cortex's error."""
        gpt = importlib.import_module("litellm.llms.openai.chat.gpt_transformation")
        mapping = importlib.import_module("litellm.litellm_core_utils.exception_mapping_utils")
        original = gpt.OpenAIGPTConfig().get_error_class(text or f"HTTP {status}", status, headers)
        try:
            mapped = mapping.exception_type(
                model=request.model,
                original_exception=original,
                custom_llm_provider=request.provider,
            )
        except Exception as exc:  # exception_type raises the mapped exception
            mapped = exc
        return map_error(mapped)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(header: str | None) -> float:
    """The provider's Retry-After in seconds when it is a short number, else 0."""
    try:
        seconds = float(header) if header else 0.0
    except ValueError:
        return 0.0
    return seconds if 0 < seconds <= 60 else 0.0


class SseDecoder:
    """OpenAI's SSE, fed as it comes off the socket: each `data:` event decoded once (orjson).

    The body is read with `readany` (one read per network packet, usually one event) and split
    into lines here, which costs a third of aiohttp's `readline` per event; the stall timer is
    armed only around that read, not per event. `[DONE]` is skipped and the body read to its
    end (the provider ends it at once), so the connection goes back to the pool.
    """

    __slots__ = ("_rest", "error")

    def __init__(self) -> None:
        self._rest = b""
        # A bad event ends the stream after the events before it (raised by the reader).
        self.error: ProviderError | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The events completed by `data`, up to a bad one (then `error` is set)."""
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > MAX_EVENT_BYTES:
            raise ProviderError("the provider sent a stream event past 16 MiB")
        events = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # comments, blank separators, `event:` lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            try:
                event = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.error = ProviderError("the provider sent a stream event that is not JSON")
                break
            if isinstance(event, dict):
                if "error" in event and not event.get("choices"):
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    text = f"the provider stream reported an error: {message}"[:300]
                    self.error = ProviderError(text)
                    break
                events.append(event)
        return events


async def backoff(attempt: int, asked_s: float) -> None:
    """The wait before a retry: what the provider asked for, else a short exponential."""
    await asyncio.sleep(asked_s or min(0.05 * 2**attempt, 2.0))
