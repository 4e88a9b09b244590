"""LlmService over LiteLLM's real HTTP path to the fake provider, and the seed interface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_settings

from cortex.config import Settings
from cortex.errors import ProviderError, ProviderTimeout
from cortex.llm import LlmService, TextDelta, ToolCalls, UsageInfo
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

# Every test runs on the direct stream path and on LiteLLM's (conftest).
BOTH_LLM_PATHS = True


@pytest.fixture
async def llm(tmp_path: Path, provider: FakeOpenAI) -> AsyncIterator[LlmService]:
    service = LlmService(make_settings(tmp_path, provider, stream_idle_timeout=0.3))
    yield service
    await service.aclose()  # the direct path's pooled connections


async def test_complete_returns_text_tool_calls_and_usage(
    llm: LlmService, provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(
            text="sure",
            tool_calls=[
                ToolCallSpec(name="calculator", arguments='{"expression": "1+1"}', id="x1")
            ],
        )
    )
    result = await llm.complete(
        [{"role": "user", "content": "add"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "calculator",
                    "description": "math",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
    )
    assert result.text == "sure"
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
        ("x1", "calculator", '{"expression": "1+1"}')
    ]
    assert result.usage is not None and result.usage.completion_tokens
    assert provider.requests[-1]["tools"][0]["function"]["name"] == "calculator"


async def test_stream_yields_typed_events(llm: LlmService, provider: FakeOpenAI) -> None:
    provider.enqueue(
        Reply(
            text="a b c",
            tool_calls=[
                ToolCallSpec(name="t1", arguments='{"a": 1}'),
                ToolCallSpec(name="t2", arguments="{}"),
            ],
        )
    )
    events = [
        e
        async for e in llm.stream(
            [{"role": "user", "content": "hi"}],
            system_prompt="be brief",
            temperature=0.2,
            max_tokens=50,
        )
    ]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a b c"
    (calls,) = [e for e in events if isinstance(e, ToolCalls)]
    assert [(c.name, c.arguments) for c in calls.calls] == [("t1", '{"a": 1}'), ("t2", "{}")]
    assert any(isinstance(e, UsageInfo) for e in events)
    body = provider.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 50


async def test_seed_interface(llm: LlmService, provider: FakeOpenAI) -> None:
    provider.enqueue(Reply(text="whole answer"), Reply(text="in pieces", chunks=3))
    assert await llm.get_completion("q", system_prompt="sys") == "whole answer"
    assert provider.requests[-1]["messages"][0]["content"] == "sys"
    pieces = [p async for p in llm.get_streaming_completion("q")]
    assert len(pieces) == 3 and "".join(pieces) == "in pieces"


async def test_errors_are_typed_never_text(llm: LlmService, provider: FakeOpenAI) -> None:
    provider.enqueue(Reply(status=401))
    with pytest.raises(ProviderError) as info:
        await llm.get_completion("q")
    assert not isinstance(info.value, ProviderTimeout) and "401" in str(info.value)
    provider.enqueue(Reply(text="x y z", stall_after=1))
    with pytest.raises(ProviderTimeout):
        async for _ in llm.get_streaming_completion("q"):
            pass


def test_seed_environment_names_are_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_DEFAULT_MODEL", "openai/from-seed")
    monkeypatch.setenv("LLM_TIMEOUT", "7")
    monkeypatch.setenv("LLM_USE_MOCK", "false")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.model({}) == "openai/from-seed" and settings.llm_timeout == 7
    monkeypatch.setenv("CORTEX_USE_MOCK", "true")
    assert Settings(_env_file=None).model({}) == "mock"  # type: ignore[call-arg]


def test_default_model_follows_keys() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.model({}) == "mock"
    assert settings.model({"OPENAI_API_KEY": "sk-x"}) == "gpt-4o-mini"
    assert settings.model({"ANTHROPIC_API_KEY": "k"}).startswith("anthropic/")


def test_chunk_window_keeps_recent_chunks_and_usage() -> None:
    from types import SimpleNamespace

    from cortex.llm import ChunkWindow

    window = ChunkWindow(size=4)
    for i in range(1000):
        window.append(SimpleNamespace(i=i, usage={"n": i} if i == 3 else None))
    assert len(window) <= 8
    assert window[-1].i == 999 and window[-2].i == 998
    assert [c.i for c in window if c.usage is not None] == [3]


async def test_long_stream_keeps_usage_with_bounded_chunks(
    llm: LlmService, provider: FakeOpenAI
) -> None:
    text = " ".join(f"w{i}" for i in range(3000))
    provider.enqueue(Reply(text=text, prompt_tokens=11, completion_tokens=3000))
    events = [e async for e in llm.stream([{"role": "user", "content": "long"}])]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == text
    (usage,) = [e for e in events if isinstance(e, UsageInfo)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3000)


def test_a_history_that_fits_is_sent_whole_without_counting_its_tokens(llm: LlmService) -> None:
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "a few words here " * 20}
        for i in range(81)
    ]
    # LiteLLM's trim hands back a copy even when nothing goes: the same list means nothing
    # was counted.
    assert llm.trim(history, "gpt-4o-mini") is history


def test_a_history_past_the_window_loses_its_oldest_messages(llm: LlmService) -> None:
    window = llm._litellm.model_cost["gpt-4o-mini"]["max_input_tokens"]
    # Plain words are about one token each: about 1.2 windows of them, in 20 messages.
    words = " ".join(f"w{i % 10}" for i in range(window // 16))
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {words}"}
        for i in range(21)
    ]
    trimmed = llm.trim(history, "gpt-4o-mini")
    assert 0 < len(trimmed) < len(history)
    assert trimmed[-1]["content"] == history[-1]["content"]  # the newest message stays


async def test_a_stream_takes_the_path_the_setting_chooses(
    llm: LlmService, provider: FakeOpenAI, llm_path: str
) -> None:
    """OpenAI-format models stream on the direct path unless it is off; others on LiteLLM."""
    assert llm.path_for() == llm_path
    assert llm.path_for("anthropic/claude-3-5-sonnet-20240620") == "litellm"
    assert llm.path_for("mock") == "litellm"
    provider.enqueue(Reply(text="a b"))
    events = [e async for e in llm.stream([{"role": "user", "content": "hi"}])]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a b"
    # Only the direct path opens Cortex's own pooled session.
    assert (llm._direct._session is not None) == (llm_path == "direct")


async def test_stream_errors_and_cost_are_the_same_on_both_paths(
    llm: LlmService, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(status=401))
    with pytest.raises(ProviderError) as info:
        async for _ in llm.stream([{"role": "user", "content": "q"}]):
            pass
    assert not isinstance(info.value, ProviderTimeout)
    assert str(info.value).startswith("AuthenticationError 401"), str(info.value)
    provider.enqueue(Reply(text="priced words", chunks=2))
    events = [
        e async for e in llm.stream([{"role": "user", "content": "q"}], model="openai/gpt-4o-mini")
    ]
    (usage,) = [e for e in events if isinstance(e, UsageInfo)]
    assert usage.completion_tokens and usage.cost_usd is not None and usage.cost_usd > 0
    assert provider.requests[-1]["model"] == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("event", "part"),
    [(b'{"error": {"message": "overloaded"}}', "overloaded"), (b"{not json", "")],
    ids=["error-object", "not-json"],
)
async def test_a_bad_stream_event_is_a_provider_error(
    llm: LlmService, provider: FakeOpenAI, event: bytes, part: str, llm_path: str
) -> None:
    """The same error type on both paths; the direct path also keeps the provider's words
    (LiteLLM's says `APIConnectionError`)."""
    provider.enqueue(Reply(text="so far", bad_event=event), Reply(text="next"))
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for e in llm.stream([{"role": "user", "content": "q"}]):
            if isinstance(e, TextDelta):
                seen.append(e.text)
    assert "".join(seen) == "so far" and not isinstance(info.value, ProviderTimeout)
    if llm_path == "direct":
        assert part in str(info.value)
    # The service goes on.
    events = [e async for e in llm.stream([{"role": "user", "content": "q"}])]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "next"
