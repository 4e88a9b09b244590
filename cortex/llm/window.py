"""Trimming a history whose messages carry content parts (attachments) to the model's window.

LiteLLM's `trim_messages` takes string contents only (it fails on a list of parts), so such a
history is trimmed here: text parts are counted by LiteLLM's token counter, each image by
LiteLLM's upper bound for a high-detail image (without decoding it), and the oldest messages go
first, whole turns at a time; the last user message always stays.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

# More than any tokenizer spends on one message's role and separators.
_TOKENS_PER_MESSAGE = 16


def has_parts(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


def image_tokens(litellm: ModuleType) -> int:
    """What one image may cost at most (OpenAI's high detail: 2,048 x 768 px of tiles)."""
    try:
        from litellm.litellm_core_utils.token_counter import high_detail_image_token_upper_bound

        return int(high_detail_image_token_upper_bound())
    except Exception:  # another LiteLLM: OpenAI's documented figure for 2,048 x 768 px
        return 1105


def tokens_of(litellm: ModuleType, model: str, message: dict[str, Any], per_image: int) -> int:
    content = message.get("content")
    total = _TOKENS_PER_MESSAGE
    parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    for part in parts:
        if part.get("type") == "image_url":
            total += per_image
        elif part.get("text"):
            total += int(litellm.token_counter(model=model, text=str(part["text"])))
    for key in ("tool_calls", "tool_call_id", "name"):
        if message.get(key):
            total += len(str(message[key]).encode())
    return total


def trim_parts(
    litellm: ModuleType, messages: list[dict[str, Any]], model: str, budget: int
) -> list[dict[str, Any]]:
    """The newest messages whose tokens fit `budget`, starting at a user message."""
    per_image = image_tokens(litellm)
    costs = [tokens_of(litellm, model, m, per_image) for m in messages]
    start, total = 0, sum(costs)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    while total > budget and start < last_user:
        total -= costs[start]
        start += 1
        while start < last_user and messages[start].get("role") != "user":
            total -= costs[start]  # a reply (and its tools) goes with the message it answered
            start += 1
    system = [m for m in messages[:start] if m.get("role") == "system"]
    return system + messages[start:]
