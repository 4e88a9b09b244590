"""What an operator sees: logs (tokens scrubbed), metrics, and per-reply telemetry."""
