"""The built-in mock model: a deterministic answer, no key, no network.

It streams through LiteLLM's own `mock_response`, so it takes the same path as a provider.
"""

from __future__ import annotations

from ..attachments.parts import describe, text_of
from .events import Messages

MOCK_LITELLM_MODEL = "openai/cortex-mock"


def mock_reply(messages: Messages) -> str:
    """The mock model's deterministic answer to the last user message."""
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    said = " ".join(text_of(last).split())
    if len(said) > 200:
        said = said[:199] + "…"
    attached = describe(last)
    received = f" I received {attached}." if attached else ""
    return (
        f'You said: "{said}".{received} I am Cortex\'s built-in mock model: no provider key is '
        "set, so no real model was called. Set CORTEX_DEFAULT_MODEL and your provider's API key "
        "(for example OPENAI_API_KEY) to talk to a real model."
    )
