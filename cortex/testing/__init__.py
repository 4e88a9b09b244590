"""Test helpers that ship with Cortex: a fake OpenAI-compatible provider for real-path tests."""
