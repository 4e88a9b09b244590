"""What a model turn yields, and what the pipeline needs of a model service (`LlmBackend`).

No LiteLLM here: a scripted fake implements `LlmBackend` for fast unit tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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


def parse_arguments(arguments: str) -> Any:
    """A tool call's arguments as JSON if they parse, else the raw text (for display)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
