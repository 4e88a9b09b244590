"""The start-up banner of `cortex serve`: what is running, where, on what, and who may connect."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from . import __version__
from .auth.tokens import LOCAL_USER
from .config import MOCK_MODEL, Settings

if TYPE_CHECKING:
    from .app import Cortex


def safe_url(url: str) -> str:
    """A database URL without its password, for banners and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        if "@" not in url or "://" not in url:
            return url
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def auth_mode(settings: Settings, required: bool) -> str:
    if required:
        return "on: bearer tokens required"
    if settings.auth == "none":
        return f"OFF (CORTEX_AUTH=none): every client is user {LOCAL_USER!r}"
    return f"off: bound to loopback with no token, every client is user {LOCAL_USER!r}"


def metrics_access(settings: Settings) -> str:
    if settings.metrics_public:
        return "public"
    if settings.metrics_token is not None:
        return "CORTEX_METRICS_TOKEN"
    return "same access as /api/"


def model_line(settings: Settings) -> str:
    model = settings.model()
    if model == MOCK_MODEL:
        return f"{model} (the built-in mock: set CORTEX_DEFAULT_MODEL and a provider key)"
    return model


def banner(app: Cortex) -> list[str]:
    """The banner's lines (printed to stdout; the same facts go to the log as `started`)."""
    s = app.settings
    base = f"http://{s.host}:{app.port}"
    required = app.gate is not None and app.gate.authenticator.required
    return [
        f"Cortex {__version__}",
        f"  address   {base}/  (WebSocket {app.url})",
        f"  database  {safe_url(s.database_url)}",
        f"  model     {model_line(s)}",
        f"  auth      {auth_mode(s, required)}",
        f"  metrics   {base}/metrics ({metrics_access(s)})",
        f"  logs      {s.log_format}, level {s.log_level.upper()}"
        + (", with message text (CORTEX_LOG_CONTENT)" if s.log_content else ""),
        f"  loop      {event_loop_name()}",
    ]


def event_loop_name() -> str:
    """`uvloop` or `asyncio`: which event loop this server runs on (CORTEX_UVLOOP)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
