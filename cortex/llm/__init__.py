"""Models through LiteLLM: the service, the events a turn yields, the mock, the boundary."""

from .boundary import ChunkWindow, load_litellm
from .events import (
    Completion,
    Finish,
    LlmBackend,
    Messages,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCalls,
    UsageInfo,
    parse_arguments,
)
from .mock import mock_reply
from .service import LlmService, get_llm_service, settings_from

__all__ = [
    "ChunkWindow",
    "Completion",
    "Finish",
    "LlmBackend",
    "LlmService",
    "Messages",
    "StreamEvent",
    "TextDelta",
    "ToolCall",
    "ToolCalls",
    "UsageInfo",
    "get_llm_service",
    "load_litellm",
    "mock_reply",
    "parse_arguments",
    "settings_from",
]
