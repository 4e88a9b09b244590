"""A fake OpenAI-compatible LLM provider for tests and benchmarks.

Over 400 lines because it is one job done faithfully: OpenAI's chat-completions wire format,
streamed and whole, with every failure a provider has (status codes, stalls, cuts, delays).

Cortex talks to models only through LiteLLM, so tests must exercise LiteLLM's real HTTP path
instead of patching it. This module serves ``/v1/chat/completions`` (streaming and not) and
``/v1/models`` on 127.0.0.1 with scripted replies, including the failure modes a real provider
shows: HTTP errors, stalls and connections cut mid-stream.

Use it in-process::

    async with FakeOpenAI(Reply(text="hi there")) as fake:
        await litellm.acompletion(model="openai/fake", api_base=fake.base_url,
                                  api_key="sk-fake", messages=[...], stream=True)

or as a separate process (benchmarks, crash tests)::

    python -m cortex.testing.fake_openai --port 0 --text "..." --chunks 100
    # prints "READY http://127.0.0.1:PORT/v1" and serves until SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = [
    "FakeOpenAI",
    "Reply",
    "ToolCallSpec",
    "last_user_text",
    "serve_until_signalled",
    "split_text",
]

_TOKEN_RE = re.compile(r"\S+\s*|\s+")
# Zero-delay chunks are coalesced into writes of about this size: one HTTP chunk per SSE event
# would make the fake, not Cortex, the bottleneck of a benchmark.
_FLUSH_BYTES = 16 * 1024
# How often a stalled response checks whether its client went away.
_STALL_POLL_S = 0.1


@dataclass
class ToolCallSpec:
    """One tool call the fake model makes; its arguments are streamed in several pieces."""

    name: str
    arguments: str
    id: str | None = None


@dataclass
class Reply:
    """One scripted answer of the fake provider, including how (and whether) it fails.

    ``chunks``: split ``text`` into this many pieces (at most ``len(text)``); ``None`` streams
    one piece per word. ``text`` is streamed before any ``tool_calls``; pass ``text=""`` for a
    tool-call-only turn. ``status`` other than 200 answers with an OpenAI error body.
    ``stall_after``/``cut_after``: after that many content chunks, go silent (until ``stop()`` or
    the client leaves) or abort the connection; for a non-streamed request, before any byte.
    ``bad_event``: streamed as one ``data:`` event after the text, then ``[DONE]`` (a provider's
    mid-stream error object, or bytes that are not JSON).
    Usage defaults: prompt = request messages' JSON length / 4, completion = chunks sent.
    """

    text: str = "Hello from the fake provider."
    chunks: int | None = None
    chunk_delay: float = 0.0
    first_chunk_delay: float = 0.0
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    status: int = 200
    stall_after: int | None = None
    cut_after: int | None = None
    bad_event: bytes | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def split_text(text: str, chunks: int | None) -> list[str]:
    """Split text into the content pieces to stream; they always join back to ``text``.

    ``chunks=None`` gives one piece per word with its trailing whitespace. A number gives that
    many pieces of near-equal length, clamped to ``len(text)`` so no piece is empty.
    """
    if not text:
        return []
    if chunks is None:
        return _TOKEN_RE.findall(text)
    n = max(1, min(chunks, len(text)))
    size, extra = divmod(len(text), n)
    pieces: list[str] = []
    pos = 0
    for i in range(n):
        end = pos + size + (1 if i < extra else 0)
        pieces.append(text[pos:end])
        pos = end
    return pieces


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a chat request's body ("" when it has none)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # OpenAI content parts
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _split_arguments(arguments: str, pieces: int = 3) -> list[str]:
    """Split a tool call's JSON arguments into at least ``pieces`` parts (some may be empty)."""
    size = -(-len(arguments) // pieces) if arguments else 0
    if size == 0:
        return [""] * pieces
    parts = [arguments[i : i + size] for i in range(0, len(arguments), size)]
    parts.extend([""] * (pieces - len(parts)))
    return parts


def _error_body(status: int) -> dict[str, Any]:
    """An OpenAI-shaped error body, so the client maps the status to its usual exception."""
    invalid = "invalid_request_error"
    kinds: dict[int, tuple[str, str, str]] = {
        400: ("Bad request (fake provider).", invalid, "bad_request"),
        401: ("Incorrect API key provided (fake provider).", invalid, "invalid_api_key"),
        403: ("Forbidden (fake provider).", invalid, "forbidden"),
        404: ("The model does not exist (fake provider).", invalid, "model_not_found"),
        429: ("Rate limit reached (fake provider).", "requests", "rate_limit_exceeded"),
        503: ("The engine is currently overloaded (fake provider).", "server_error", "overloaded"),
    }
    fallback = (f"Server error (fake provider, HTTP {status}).", "server_error", "server_error")
    message, kind, code = kinds.get(status, fallback)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _rough_prompt_tokens(body: dict[str, Any]) -> int:
    """About four characters per token, like OpenAI's rule of thumb; exactness is not the point."""
    messages = body.get("messages", [])
    return max(1, len(json.dumps(messages, separators=(",", ":"))) // 4)


class FakeOpenAI:
    """An aiohttp server on 127.0.0.1 that answers like OpenAI's chat completions API.

    Replies come from ``enqueue``'d replies (FIFO, one per request), then ``responder`` (a hook
    that may look at the request body), then ``default``. Every request body is recorded in
    ``requests`` before it is answered.
    """

    def __init__(self, default: Reply | None = None) -> None:
        self.default: Reply = default if default is not None else Reply()
        self.responder: Callable[[dict[str, Any]], Reply] | None = None
        self.requests: list[dict[str, Any]] = []
        self.base_url: str = ""
        self.port: int = 0
        self._queue: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._handlers: dict[asyncio.Task[Any], web.Request] = {}
        self._ids = itertools.count(1)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0) -> str:
        """Start serving on 127.0.0.1 (a free port by default) and return the ``/v1`` base URL."""
        if self._runner is not None:
            return self.base_url
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/models", self._handle_models)
        # handler_cancellation: a client that goes away ends its (possibly stalled) handler.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_address=True)
        await site.start()
        self._runner = runner
        self._stopping = asyncio.Event()
        self.port = int(runner.addresses[0][1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; open (stalled or slow) responses are cut so this never hangs."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()
        for task, request in list(self._handlers.items()):
            self._cut(request)
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def active_requests(self) -> int:
        """Chat requests being answered now; lets a test see that a client closed its stream."""
        return len(self._handlers)

    # ------------------------------------------------------------------ scripting

    def enqueue(self, *replies: Reply) -> None:
        """Script the next replies, consumed one per chat request in FIFO order."""
        self._queue.extend(replies)

    def reply_for(self, body: dict[str, Any]) -> Reply:
        """Pick the reply for a request: the queue first, then ``responder``, then ``default``."""
        if self._queue:
            return self._queue.popleft()
        if self.responder is not None:
            return self.responder(body)
        return self.default

    # ------------------------------------------------------------------- handlers

    async def _handle_models(self, request: web.Request) -> web.Response:
        """List one model, for clients that probe the endpoint before use."""
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "cortex"}
                ],
            }
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        """Answer one chat completion request according to its scripted reply."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = request
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return web.json_response(
                    {
                        "error": {
                            "message": "Request body is not valid JSON (fake provider).",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_json",
                        }
                    },
                    status=400,
                )
            if not isinstance(body, dict):
                return web.json_response(_error_body(400), status=400)
            self.requests.append(body)
            reply = self.reply_for(body)
            if reply.status != 200:
                if reply.first_chunk_delay:
                    await asyncio.sleep(reply.first_chunk_delay)
                return web.json_response(_error_body(reply.status), status=reply.status)
            if body.get("stream"):
                return await self._stream(request, body, reply)
            return await self._complete(request, body, reply)
        finally:
            self._handlers.pop(task, None)

    async def _stall(self, request: web.Request) -> None:
        """Keep the response open without sending, until stop() or the client goes away."""
        while not self._stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _STALL_POLL_S)

    @staticmethod
    def _cut(request: web.Request) -> None:
        """Abort the TCP connection so the client sees an error mid-response."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _usage(self, body: dict[str, Any], reply: Reply, emitted: int) -> dict[str, int]:
        """Token usage as OpenAI reports it; defaults are rough but stable."""
        prompt = (
            reply.prompt_tokens if reply.prompt_tokens is not None else _rough_prompt_tokens(body)
        )
        completion = reply.completion_tokens if reply.completion_tokens is not None else emitted
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _complete(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        """A whole ``chat.completion`` object; stall/cut apply before anything is sent."""
        if reply.first_chunk_delay:
            await asyncio.sleep(reply.first_chunk_delay)
        pieces = split_text(reply.text, reply.chunks)
        if reply.stall_after is not None:
            await self._stall(request)
        if reply.cut_after is not None or reply.stall_after is not None:
            # A broken connection, never a reply; aiohttp ignores the unsendable response.
            self._cut(request)
            return web.Response()
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not reply.tool_calls else None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": spec.id or f"call_{n}",
                    "type": "function",
                    "function": {"name": spec.name, "arguments": spec.arguments},
                }
                for n, spec in enumerate(reply.tool_calls)
            ]
        return web.json_response(
            {
                "id": f"chatcmpl-fake-{next(self._ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model", "fake-model")),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    }
                ],
                "usage": self._usage(body, reply, len(pieces) + len(reply.tool_calls)),
            }
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        """Server-sent ``chat.completion.chunk`` events, shaped and ordered like OpenAI's."""
        chunk_id = f"chatcmpl-fake-{next(self._ids)}"
        model = str(body.get("model", "fake-model"))
        created = int(time.time())
        # Every chunk shares this envelope: encode it once, and only the delta per chunk.
        head = (
            f'data: {{"id":{json.dumps(chunk_id)},"object":"chat.completion.chunk",'
            f'"created":{created},"model":{json.dumps(model)},'
            '"system_fingerprint":null,"choices":[{"index":0,"delta":'
        ).encode()
        tail_open = b',"logprobs":null,"finish_reason":null}]}\n\n'

        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": chunk_id,
            }
        )
        await response.prepare(request)

        buffer = bytearray()
        delay = reply.chunk_delay

        async def send(event: bytes, pace: bool) -> None:
            """Queue one event; with a delay, send it at once and wait before the next one."""
            buffer.extend(event)
            if pace and delay > 0:
                await response.write(bytes(buffer))
                buffer.clear()
                await asyncio.sleep(delay)
            elif len(buffer) >= _FLUSH_BYTES:
                await response.write(bytes(buffer))
                buffer.clear()

        async def flush() -> None:
            if buffer:
                await response.write(bytes(buffer))
                buffer.clear()

        if reply.first_chunk_delay:
            await asyncio.sleep(reply.first_chunk_delay)
        await send(head + b'{"role":"assistant","content":""}' + tail_open, pace=False)

        pieces = split_text(reply.text, reply.chunks)
        limits = [n for n in (reply.stall_after, reply.cut_after) if n is not None]
        end = min([len(pieces), *limits])
        for piece in itertools.islice(pieces, end):
            delta = b'{"content":' + json.dumps(piece).encode() + b"}"
            await send(head + delta + tail_open, pace=True)
        if reply.bad_event is not None:
            await send(b"data: " + reply.bad_event + b"\n\n", pace=False)
            await send(b"data: [DONE]\n\n", pace=False)
            await flush()
            await response.write_eof()
            return response
        if limits:
            await flush()
            if reply.stall_after is not None and reply.stall_after == min(limits):
                await self._stall(request)
            # A broken connection, never a finished reply (aiohttp ignores the failed eof).
            self._cut(request)
            return response

        tool_fragments = 0
        for delta_obj in self._tool_call_deltas(reply.tool_calls):
            tool_fragments += 1
            await send(
                head + json.dumps(delta_obj, separators=(",", ":")).encode() + tail_open, pace=True
            )

        finish = "tool_calls" if reply.tool_calls else "stop"
        await send(
            head + b'{},"logprobs":null,"finish_reason":"%s"}]}\n\n' % finish.encode(),
            pace=False,
        )
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            event = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [],
                "usage": self._usage(body, reply, len(pieces) + tool_fragments),
            }
            encoded = json.dumps(event, separators=(",", ":")).encode()
            await send(b"data: " + encoded + b"\n\n", pace=False)
        await send(b"data: [DONE]\n\n", pace=False)
        await flush()
        await response.write_eof()
        return response

    @staticmethod
    def _tool_call_deltas(calls: list[ToolCallSpec]) -> Iterator[dict[str, Any]]:
        """OpenAI-style tool-call deltas; several calls interleave their fragments by index."""
        streams: list[list[dict[str, Any]]] = []
        for index, spec in enumerate(calls):
            fragments: list[dict[str, Any]] = [
                {
                    "index": index,
                    "id": spec.id or f"call_{index}",
                    "type": "function",
                    "function": {"name": spec.name, "arguments": ""},
                }
            ]
            fragments.extend(
                {"index": index, "function": {"arguments": part}}
                for part in _split_arguments(spec.arguments)
            )
            streams.append(fragments)
        for round_ in itertools.zip_longest(*streams):
            for fragment in round_:
                if fragment is not None:
                    yield {"tool_calls": [fragment]}


# ----------------------------------------------------------------------------- process entry


async def _serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT, announcing the base URL on stdout once ready."""
    text = args.text
    if args.words is not None:
        text = " ".join(f"word{i}" for i in range(args.words))
    fake = FakeOpenAI(
        Reply(
            text=text,
            chunks=args.chunks,
            chunk_delay=args.chunk_delay,
            first_chunk_delay=args.first_chunk_delay,
        )
    )
    await serve_until_signalled(fake, port=args.port)


async def serve_until_signalled(fake: FakeOpenAI, port: int = 0) -> None:
    """Serve `fake` until SIGTERM/SIGINT, announcing ``READY <base url>`` on stdout once ready.

    The body of a provider process (see ``cortex.testing.processes.start_process``).
    """
    base_url = await fake.start(port=port)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    sys.stdout.write(f"READY {base_url}\n")
    sys.stdout.flush()
    try:
        await done.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m cortex.testing.fake_openai``."""
    parser = argparse.ArgumentParser(
        prog="python -m cortex.testing.fake_openai",
        description="Serve a fake OpenAI-compatible chat completions API on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = a free one)")
    parser.add_argument("--text", default=Reply.text, help="the reply text")
    parser.add_argument(
        "--words", type=int, default=None, help="reply with N generated words instead of --text"
    )
    parser.add_argument(
        "--chunks", type=int, default=None, help="split the text into N chunks (default: per word)"
    )
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument(
        "--first-chunk-delay", type=float, default=0.0, help="seconds before the first chunk"
    )
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
