"""Keeping tokens out of logs: `scrub()` for text, `TokenScrubber` for log records."""

from __future__ import annotations

import logging
import re

_SECRETS = (
    (re.compile(r"(?i)(access_token=)[^&\s#\"']*"), r"\1[redacted]"),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)[^\n]*"), r"\1[redacted]"),
    # Token-like values only (tokens are 32+ characters), so "bearer tokens" stays readable.
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=:-]{16,}"), r"\1[redacted]"),
    (re.compile(r"ctx_[A-Za-z0-9_-]{8,}"), "ctx_[redacted]"),
)


_HINTS = ("access_token", "authorization", "bearer", "ctx_")


def scrub(text: str) -> str:
    """`text` with anything that looks like a token replaced by `[redacted]`."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _HINTS):
        return text  # the common case, without running the expressions
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class TokenScrubber(logging.Filter):
    """Rewrites a record's message and traceback without tokens.

    Attached to the logger handed to websockets, which logs request paths (with their query) and
    every request header at DEBUG level, and to the CLI's log handlers as a second line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = scrub(text), None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def scrubbed_logger(name: str) -> logging.Logger:
    """A logger whose records pass through `TokenScrubber` (added once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, TokenScrubber) for f in logger.filters):
        logger.addFilter(TokenScrubber())
    return logger
