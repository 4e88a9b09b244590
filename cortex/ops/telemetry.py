"""What happened, for operators: one log line per event and the matching metrics.

The server and the router report here (a connection opened, a message stored, a reply ended),
and this module turns each report into a log event (`cortex.logs`) and metric updates
(`cortex.metrics`). A reply is followed by a `ReplyTrace`, which collects its figures as it goes
(a timestamp at the first token, usage per model turn) and reports them once, when it ends.
Message text is only added to log events when `CORTEX_LOG_CONTENT=true`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..config import Settings
from .logs import CONNECTION, CONVERSATION, REQUEST, event
from .metrics import Metrics

log_connection = logging.getLogger("cortex.connection")
log_message = logging.getLogger("cortex.message")
log_reply = logging.getLogger("cortex.reply")
log_conversation = logging.getLogger("cortex.conversation")

PROVIDER_CODES = frozenset({"provider_error", "provider_timeout"})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


class Telemetry:
    """Logs and metrics of one app. `metrics=None` logs only (unit tests, tools)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.content = settings.log_content
        # Called with every finished reply (the auto-titler listens here).
        self.reply_listeners: list[Callable[[ReplyTrace], None]] = []

    # ---- connections --------------------------------------------------------------------

    def connection_opened(self, connection_id: int, *, user: str, remote: str, via: str) -> None:
        if self.metrics is not None:
            self.metrics.connections.inc()
            self.metrics.connections_open.inc()
        # Connections are logged at DEBUG: at INFO, 10,000 clients coming and going cost more
        # than accepting them (bench/connections.py); the metrics count them anyway.
        event(
            log_connection,
            "connection open",
            logging.DEBUG,
            conn=connection_id,
            user=user,
            remote=remote,
            via=via,
        )

    def connection_closed(
        self,
        connection_id: int,
        *,
        user: str,
        seconds: float,
        frames_in: int,
        frames_out: int,
        code: int | None,
        reason: str | None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.connections_open.dec()
        event(
            log_connection,
            "connection close",
            logging.DEBUG,
            conn=connection_id,
            user=user,
            code=code,
            reason=reason or None,
            duration_ms=_ms(seconds),
            frames_in=frames_in,
            frames_out=frames_out,
        )

    # ---- conversations ------------------------------------------------------------------

    def message_stored(
        self,
        *,
        user: str,
        conversation_id: str,
        seq: int,
        content: str,
        created: bool,
        request_id: str | None,
        connection_id: int | None,
    ) -> None:
        event(
            log_message,
            "message",
            conn=connection_id,
            req=request_id,
            conv=conversation_id,
            user=user,
            seq=seq,
            chars=len(content),
            new_conversation=created or None,
            text=content if self.content else None,
        )

    def conversation_changed(
        self, action: str, *, user: str, conversation_id: str, **fields: Any
    ) -> None:
        """A rename, delete, configure or auto-title. `fields` must hold no message text
        (a title and a system prompt count as text: they are logged only with log_content)."""
        event(log_conversation, action, conv=conversation_id, user=user, **fields)

    def completion(
        self,
        purpose: str,
        *,
        conversation_id: str,
        model: str,
        seconds: float,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cost_usd: float | None = None,
        error_code: str | None = None,
    ) -> None:
        """A model call that is not a reply (an automatic title): its usage and outcome."""
        if self.metrics is not None:
            self.metrics.usage(
                model=model,
                prompt_tokens=prompt_tokens or 0,
                completion_tokens=completion_tokens or 0,
                cost_usd=cost_usd,
                error_codes=(error_code,) if error_code in PROVIDER_CODES else (),
            )
        event(
            log_reply,
            "completion",
            logging.INFO if error_code is None else logging.WARNING,
            conv=conversation_id,
            purpose=purpose,
            model=model,
            error=error_code,
            duration_ms=_ms(seconds),
            tokens_in=prompt_tokens,
            tokens_out=completion_tokens,
        )

    # ---- replies ------------------------------------------------------------------------

    def reply(
        self,
        *,
        conversation_id: str,
        model: str,
        user_seq: int,
        request_id: str | None,
        connection_id: int | None,
    ) -> ReplyTrace:
        """Start following a reply; call `end()` on the trace when it is over, whatever happens."""
        return ReplyTrace(
            self,
            conversation_id=conversation_id,
            model=model,
            user_seq=user_seq,
            request_id=request_id,
            connection_id=connection_id,
        )


class ReplyTrace:
    """The figures of one reply (every model turn and tool round of the answer to a message)."""

    __slots__ = (
        "telemetry",
        "conversation_id",
        "model",
        "user_seq",
        "request_id",
        "connection_id",
        "started",
        "first_at",
        "status",
        "error_code",
        "provider_errors",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "turns",
        "tool_calls",
        "chars",
        "text",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        conversation_id: str,
        model: str,
        user_seq: int,
        request_id: str | None,
        connection_id: int | None,
    ) -> None:
        self.telemetry = telemetry
        self.conversation_id = conversation_id
        self.model = model
        self.user_seq = user_seq
        self.request_id = request_id
        self.connection_id = connection_id
        self.started = time.monotonic()
        self.first_at: float | None = None
        # Until a turn reports, the reply failed before it could (e.g. the database).
        self.status = "error"
        self.error_code: str | None = "internal"
        self.provider_errors: list[str] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd: float | None = None
        self.turns = 0
        self.tool_calls = 0
        self.chars = 0
        self.text = ""
        # The reply runs in its own task: every line it logs is about this request.
        CONNECTION.set(connection_id)
        REQUEST.set(request_id)
        CONVERSATION.set(conversation_id)

    def first_token(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()

    def turn_finished(
        self,
        *,
        status: str,
        error_code: str | None,
        text: str,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cost_usd: float | None = None,
    ) -> None:
        self.turns += 1
        self.status, self.error_code = status, error_code
        if error_code in PROVIDER_CODES:
            self.provider_errors.append(error_code)
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0
        if cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost_usd
        self.chars = len(text)
        if self.telemetry.content:
            self.text = text

    def failed(self, error_code: str) -> None:
        """The reply ended in error after its turns (e.g. the tool round limit)."""
        self.status, self.error_code = "error", error_code

    def tool_finished(self, name: str, ok: bool, seconds: float) -> None:
        self.tool_calls += 1
        metrics = self.telemetry.metrics
        if metrics is not None:
            metrics.tool_call(name, ok, seconds)

    def end(self) -> None:
        """Report the reply: one log line, its metrics, then the listeners."""
        now = time.monotonic()
        duration = now - self.started
        ttft = self.first_at - self.started if self.first_at is not None else None
        telemetry = self.telemetry
        if telemetry.metrics is not None:
            telemetry.metrics.reply(
                model=self.model,
                status=self.status,
                first_token_s=ttft,
                duration_s=duration,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cost_usd=self.cost_usd,
                error_codes=self.provider_errors,
            )
        ok = self.status in ("complete", "cancelled")
        event(
            log_reply,
            "reply",
            logging.INFO if ok else logging.WARNING,
            conn=self.connection_id,
            req=self.request_id,
            conv=self.conversation_id,
            seq=self.user_seq,
            model=self.model,
            status=self.status,
            error=self.error_code,
            ttft_ms=_ms(ttft) if ttft is not None else None,
            duration_ms=_ms(duration),
            tokens_in=self.prompt_tokens,
            tokens_out=self.completion_tokens,
            cost_usd=round(self.cost_usd, 8) if self.cost_usd is not None else None,
            turns=self.turns,
            tool_calls=self.tool_calls or None,
            chars=self.chars,
            text=self.text if telemetry.content else None,
        )
        for listener in telemetry.reply_listeners:
            try:
                listener(self)
            except Exception:
                log_reply.exception("a reply listener failed")
