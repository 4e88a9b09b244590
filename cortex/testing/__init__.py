"""Test helpers that ship with Cortex, shared by the tests and the bench scripts.

- `fake_openai`: a fake OpenAI-compatible provider for real-path tests;
- `processes`: `cortex serve` (and other children) as real processes on a free port;
- `services`: private PostgreSQL and Redis servers;
- `deltas`: joining a reply's `delta` events by offset;
- `soak`: many disturbing clients at once, and the check of the database after them.
"""
