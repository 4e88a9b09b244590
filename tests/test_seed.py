"""The seed design's documented usage of `LlmService`, run as the seed wrote it.

This is the one module that patches `litellm.acompletion`: it proves the seed's own example. Every
other LLM test goes through LiteLLM's real HTTP path to the fake provider.
"""

from __future__ import annotations

from unittest.mock import MagicMock, patch

import pytest

from cortex.config import Settings
from cortex.llm import LlmService, get_llm_service


@pytest.fixture(autouse=True)
def _no_provider_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "MISTRAL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("LLM_DEFAULT_MODEL", "LLM_USE_MOCK", "LLM_TIMEOUT", "CORTEX_DEFAULT_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CORTEX_USE_MOCK", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout's


async def test_the_seed_example_as_written() -> None:
    mock_response = MagicMock()
    mock_response.choices = [MagicMock()]
    mock_response.choices[0].message.content = "Test response"

    with patch("litellm.acompletion", return_value=mock_response) as acompletion:
        service = LlmService({"use_mock": False})
        assert await service.get_completion("Test prompt") == "Test response"

    (call,) = acompletion.await_args_list
    assert call.kwargs["messages"][-1] == {"role": "user", "content": "Test prompt"}


async def test_seed_dict_config_sets_model_and_timeout() -> None:
    service = LlmService({"default_model": "openai/gpt-seed", "timeout": 7, "use_mock": False})
    assert service.default_model() == "openai/gpt-seed"
    assert service.settings.llm_timeout == 7


async def test_seed_mock_mode_answers_both_calls() -> None:
    service = LlmService({"use_mock": True})
    whole = await service.get_completion("hello there")
    assert "hello there" in whole and "mock" in whole
    pieces = [piece async for piece in service.get_streaming_completion("hello there")]
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_config_may_be_none_settings_or_dict() -> None:
    assert LlmService().settings.model() == "mock"  # no key, no model: the mock
    settings = Settings(_env_file=None, default_model="openai/x")  # type: ignore[call-arg]
    assert LlmService(settings).settings is settings
    with pytest.raises(ValueError, match="unknown key 'tempreature'"):
        LlmService({"tempreature": 0.2})


def test_get_llm_service_shares_one_until_given_a_config() -> None:
    first = get_llm_service({"use_mock": True})
    assert get_llm_service() is first
    second = get_llm_service({"default_model": "openai/other"})
    assert second is not first and get_llm_service().default_model() == "openai/other"
