"""From a user message to a stored, streamed reply: intake, workers, replies, tools, reads."""
