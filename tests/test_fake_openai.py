"""The fake OpenAI provider, driven through LiteLLM's real HTTP path.

Other tests trust this fake to behave like a real provider as seen through LiteLLM, so these tests
pin down what LiteLLM makes of each scripted behaviour (chunk shapes, usage, tool-call deltas and
the exception raised for each failure).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm.exceptions import MidStreamFallbackError  # noqa: E402

from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec, split_text  # noqa: E402

litellm.suppress_debug_info = True

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


async def call(fake: FakeOpenAI, **kwargs: Any) -> Any:
    """One litellm.acompletion against the fake, without retries unless asked."""
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("num_retries", 0)
    return await litellm.acompletion(
        model="openai/fake-model", api_base=fake.base_url, api_key="sk-fake", **kwargs
    )


async def collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --------------------------------------------------------------------------- text streaming


@pytest.mark.parametrize("chunks", [None, 1, 7, 10_000])
async def test_streamed_text_reassembles(fake: FakeOpenAI, chunks: int | None) -> None:
    text = 'The quick  brown fox\njumps over the lazy dog. Ünïcode ✓ "quoted"'
    fake.enqueue(Reply(text=text, chunks=chunks))
    got = await collect(await call(fake, stream=True))
    assert text_of(got) == text
    assert got[0].choices[0].delta.role == "assistant"
    content = [c for c in got if c.choices and c.choices[0].delta.content]
    assert len(content) == len(split_text(text, chunks))
    assert got[-1].choices[0].finish_reason == "stop"


async def test_include_usage_yields_usage_chunk(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(text="one two three"), Reply(prompt_tokens=11, completion_tokens=22))
    got = await collect(await call(fake, stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in got if getattr(c, "usage", None) is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 3  # one per chunk by default
    assert usage[0].prompt_tokens >= 1
    assert usage[0].total_tokens == usage[0].prompt_tokens + 3

    got = await collect(await call(fake, stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in got if getattr(c, "usage", None) is not None]
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (11, 22)
    assert usage[0].total_tokens == 33


async def test_two_tool_calls_stream_interleaved_and_reassemble(fake: FakeOpenAI) -> None:
    weather = '{"city": "Paris", "unit": "celsius"}'
    fake.enqueue(
        Reply(
            text="",
            tool_calls=[
                ToolCallSpec("get_weather", weather),
                ToolCallSpec("add", '{"a": 1, "b": 2}', id="call_custom"),
            ],
        )
    )
    got = await collect(await call(fake, stream=True))

    calls: dict[int, dict[str, str]] = {}
    order: list[int] = []
    pieces: dict[int, int] = {}
    for chunk in got:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            order.append(tc.index)
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function.name:
                entry["name"] = tc.function.name
            if tc.function.arguments:
                entry["arguments"] += tc.function.arguments
                pieces[tc.index] = pieces.get(tc.index, 0) + 1
    assert calls == {
        0: {"id": "call_0", "name": "get_weather", "arguments": weather},
        1: {"id": "call_custom", "name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    assert order[:4] == [0, 1, 0, 1]  # fragments of the two calls interleave
    assert min(pieces.values()) >= 3
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert got[-1].choices[0].finish_reason == "tool_calls"
    assert text_of(got) == ""


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(500, litellm.InternalServerError), (429, litellm.RateLimitError)],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_http_errors_raise_typed_exceptions(
    fake: FakeOpenAI, status: int, exc_type: type[Exception], stream: bool
) -> None:
    fake.enqueue(Reply(status=status))
    with pytest.raises(exc_type):
        result = await call(fake, stream=stream)
        if stream:
            await collect(result)
    assert len(fake.requests) == 1


async def test_error_body_is_openai_shaped(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(status=429))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fake.base_url}/chat/completions", json={"messages": []}) as resp,
    ):
        assert resp.status == 429
        body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == "rate_limit_exceeded"


async def test_retries_succeed_after_rate_limits(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(status=429), Reply(status=429), Reply(text="finally"))
    result = await call(fake, num_retries=2)
    assert result.choices[0].message.content == "finally"
    assert len(fake.requests) == 3


async def test_cut_raises_mid_stream(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(text="a b c d e f", cut_after=3))
    received: list[str] = []
    stream = await call(fake, stream=True)
    with pytest.raises((litellm.APIConnectionError, MidStreamFallbackError)) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "a b c "
    # LiteLLM wraps the broken connection; the cause is a connection error either way.
    cause = getattr(info.value, "original_exception", info.value)
    assert isinstance(cause, litellm.APIConnectionError)


async def test_cut_before_a_non_streamed_reply(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(cut_after=0))
    # LiteLLM maps a connection dropped before any response to InternalServerError.
    with pytest.raises((litellm.InternalServerError, litellm.APIConnectionError)) as info:
        await call(fake)
    assert "Connection error" in str(info.value)
    assert len(fake.requests) == 1


async def test_stall_times_out_and_stop_does_not_hang() -> None:
    fake = FakeOpenAI(Reply(text="a b c d", stall_after=2))
    await fake.start()
    received: list[str] = []
    stream = await call(fake, stream=True)

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    consumer = asyncio.ensure_future(consume())
    done, _ = await asyncio.wait({consumer}, timeout=0.4)
    assert not done  # stalled: no more chunks, no end
    assert "".join(received) == "a b "
    assert fake.active_requests == 1

    started = time.monotonic()
    await fake.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(Exception):  # noqa: B017 - the stream breaks, as with a cut
        await asyncio.wait_for(consumer, 2)


async def test_stall_is_observable_with_wait_for(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(text="a b c", stall_after=1))
    stream = await call(fake, stream=True)
    iterator = stream.__aiter__()
    first = await asyncio.wait_for(iterator.__anext__(), 2)
    assert first.choices[0].delta.role == "assistant"
    second = await asyncio.wait_for(iterator.__anext__(), 2)
    assert second.choices[0].delta.content == "a "
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(iterator.__anext__(), 0.3)


async def test_stalled_response_ends_when_client_leaves(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(text="a b c", stall_after=0))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{fake.base_url}/chat/completions", json={"messages": [], "stream": True}
        )
        await resp.content.readline()
        assert fake.active_requests == 1
        resp.close()
    for _ in range(50):
        if fake.active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert fake.active_requests == 0


async def test_litellm_timeout_on_stall(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(stall_after=1))
    with pytest.raises(litellm.Timeout):
        await collect(await call(fake, stream=True, timeout=0.3))


async def test_delays_pace_the_stream(fake: FakeOpenAI) -> None:
    fake.enqueue(Reply(text="a b c d", chunk_delay=0.05, first_chunk_delay=0.1))
    started = time.monotonic()
    stream = await call(fake, stream=True)
    got = await collect(stream)
    assert text_of(got) == "a b c d"
    assert time.monotonic() - started >= 0.1 + 3 * 0.05


# --------------------------------------------------------------------------- non-streaming


async def test_non_streaming_completion(fake: FakeOpenAI) -> None:
    fake.enqueue(
        Reply(text="whole answer", prompt_tokens=5, completion_tokens=2),
        Reply(text="", tool_calls=[ToolCallSpec("lookup", '{"q": "x"}', id="call_9")]),
    )
    result = await call(fake)
    assert result.choices[0].message.content == "whole answer"
    assert result.choices[0].finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 2)

    result = await call(fake)
    (tool_call,) = result.choices[0].message.tool_calls
    assert (tool_call.id, tool_call.function.name) == ("call_9", "lookup")
    assert json.loads(tool_call.function.arguments) == {"q": "x"}
    assert result.choices[0].finish_reason == "tool_calls"


# --------------------------------------------------------------------------- scripting


async def test_requests_are_recorded_and_replies_follow_the_script(fake: FakeOpenAI) -> None:
    fake.default = Reply(text="default")
    fake.enqueue(Reply(text="first"), Reply(text="second"))
    texts = []
    for i in range(3):
        result = await call(fake, messages=[{"role": "user", "content": f"message {i}"}])
        texts.append(result.choices[0].message.content)
    fake.responder = lambda body: Reply(text=body["messages"][-1]["content"].upper())
    result = await call(fake, messages=[{"role": "user", "content": "echo me"}])
    texts.append(result.choices[0].message.content)

    assert texts == ["first", "second", "default", "ECHO ME"]
    assert [r["messages"][-1]["content"] for r in fake.requests] == [
        "message 0",
        "message 1",
        "message 2",
        "echo me",
    ]
    assert all(r["model"] == "fake-model" for r in fake.requests)


async def test_models_endpoint(fake: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{fake.base_url}/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1


def test_split_text() -> None:
    assert split_text("", None) == []
    assert split_text("a  b\nc", None) == ["a  ", "b\n", "c"]
    assert split_text("  lead", None) == ["  ", "lead"]
    assert split_text("abcdefg", 3) == ["abc", "de", "fg"]
    assert split_text("ab", 5) == ["a", "b"]
    assert "".join(split_text("x y " * 50, 13)) == "x y " * 50


# --------------------------------------------------------------------------- separate process


async def test_runs_as_a_separate_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.testing.fake_openai",
        "--words",
        "40",
        "--chunks",
        "8",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("READY http://127.0.0.1:")
        base_url = line.split()[1]
        payload = {"messages": MESSAGES, "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base_url}/chat/completions", json=payload) as resp,
        ):
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [line async for line in resp.content if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]\n"
        assert len(events) == 1 + 8 + 1 + 1  # role, content, finish, [DONE]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
