"""Logs: one line per event, readable text by default, JSON with `CORTEX_LOG_FORMAT=json`.

An event is a short name plus fields: `event(log, "reply", model=..., ttft_ms=...)`. Fields are
kept on the record (`record.cortex`) so that the JSON formatter writes them as keys and the text
formatter as `key=value`. The connection, request and conversation a line is about come from
context variables set where a frame is handled, so ordinary `log.warning(...)` lines carry them
too. Message text never reaches a log unless `CORTEX_LOG_CONTENT=true`: Cortex only adds it to
its own events then, and the loggers of libraries that would print it at DEBUG (websockets'
frames, SQLAlchemy's parameters, LiteLLM's requests) are held at INFO or above.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from ..config import Settings
from .scrubber import TokenScrubber, scrub

CONNECTION: ContextVar[int | None] = ContextVar("cortex_connection", default=None)
REQUEST: ContextVar[str | None] = ContextVar("cortex_request", default=None)
CONVERSATION: ContextVar[str | None] = ContextVar("cortex_conversation", default=None)

FIELDS = "cortex"  # the LogRecord attribute that holds an event's fields
_CONTEXT = (("conn", CONNECTION), ("req", REQUEST), ("conv", CONVERSATION))
# Loggers that print message text or SQL parameters below these levels.
_CONTENT_LOGGERS = {
    "websockets": logging.WARNING,  # its INFO lines repeat Cortex's own connection events
    "sqlalchemy": logging.WARNING,
    "aiosqlite": logging.INFO,
    "asyncpg": logging.INFO,
    "LiteLLM": logging.WARNING,  # its INFO line per call repeats Cortex's reply event
    "LiteLLM Router": logging.WARNING,
    "LiteLLM Proxy": logging.WARNING,
    "openai": logging.INFO,
    "httpx": logging.WARNING,
    "httpcore": logging.INFO,
}
# Start-up chatter, whatever the level.
_QUIET_LOGGERS = {"alembic.runtime.plugins": logging.WARNING}
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; fields that are None are left out."""
    if logger.isEnabledFor(level):
        values = {key: value for key, value in fields.items() if value is not None}
        logger.log(level, name, extra={FIELDS: values, "event": name})


class ContextFilter(logging.Filter):
    """Adds the current connection, request and conversation ids to every record's fields.

    Attach it to a handler: it then runs in the task that logged, where the context is set.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, Any] | None = getattr(record, FIELDS, None)
        context = {key: var.get() for key, var in _CONTEXT}
        context = {key: value for key, value in context.items() if value is not None}
        if context:
            merged = {**context, **fields} if fields else context
            setattr(record, FIELDS, merged)
        return True


class FieldScrubber(TokenScrubber):
    """The token scrubber, applied to event fields as well as to the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        fields: dict[str, Any] | None = getattr(record, FIELDS, None)
        if fields:
            setattr(
                record,
                FIELDS,
                {k: scrub(v) if isinstance(v, str) else v for k, v in fields.items()},
            )
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message key=value ...`; values with spaces are JSON-quoted."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _timestamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        line = super().formatMessage(record)
        fields: dict[str, Any] | None = getattr(record, FIELDS, None)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bool | int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text and not any(c.isspace() or c in "\"'=" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the event's fields, exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields: dict[str, Any] | None = getattr(record, FIELDS, None)
        name = getattr(record, "event", None)
        if name is not None:
            payload["event"] = name
        if fields:
            for key, value in fields.items():
                payload.setdefault(key, value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False, default=str)


class _CortexHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (a second call replaces it).

    Without a stream of its own it writes to whatever `sys.stderr` is at the time of each line,
    so that it follows a redirection made later (a test runner's capture).
    """

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._own: Any = stream

    @property
    def stream(self) -> Any:
        return self._own if self._own is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        self._own = value


def make_handler(settings: Settings, stream: Any = None) -> logging.Handler:
    """A stream handler with Cortex's formatter and filters (context, token scrubbing)."""
    handler = _CortexHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(FieldScrubber())
    return handler


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Route log lines through Cortex's handler on the root logger (called by the CLI).

    Other handlers (a test runner's) stay; a previous Cortex handler is replaced.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _CortexHandler):
            root.removeHandler(old)
    root.addHandler(make_handler(settings, stream))
    root.setLevel(settings.log_level.upper())
    floors = {**_QUIET_LOGGERS, **({} if settings.log_content else _CONTENT_LOGGERS)}
    for name, floor in floors.items():
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < floor:
            logger.setLevel(floor)
