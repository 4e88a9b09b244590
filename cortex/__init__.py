"""Cortex: a self-hosted chat router over WebSocket, any LLM through LiteLLM."""

__version__ = "0.1.0"
