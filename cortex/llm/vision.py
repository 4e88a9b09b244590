"""Which models take images: LiteLLM's model map, and `CORTEX_VISION_MODELS` for the models it
does not know (self-hosted ones: `openai/...` with a base URL, `ollama_chat/...`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import MOCK_MODEL
from .boundary import load_litellm


def takes_images(model: str, declared: Sequence[str] = ()) -> bool:
    """Whether `model` may be sent image parts. The mock does (it describes what it got)."""
    if model == MOCK_MODEL or "*" in declared or model in declared:
        return True
    try:
        return bool(load_litellm().supports_vision(model=model))
    except Exception:  # a model LiteLLM cannot map: not declared, so no
        return False
