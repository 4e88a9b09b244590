"""Read-only HTTP on the WebSocket's port: health, history JSON and the static chat page.

Served from websockets' `process_request` hook, so one port and one process serve both.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import export
from .views import conversation_view, message_view

if TYPE_CHECKING:
    from .app import Cortex

WS_PATH = "/ws"
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def respond(
    status: int, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *_SECURITY_HEADERS,
            *extra,
        ]
    )
    reason = {
        200: "OK",
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }.get(status, "")
    return Response(status, reason, headers, body)


def json_response(status: int, payload: Any) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return respond(status, body, "application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}})


Handler = Callable[["Cortex", str, dict[str, list[str]], str], Awaitable[Response]]


class HttpRoutes:
    """GET routes. Every handler gets (app, owner, query, path)."""

    def __init__(self, app: Cortex) -> None:
        self.app = app

    async def handle(self, request: Request, owner: str | None) -> Response | None:
        """A response for an HTTP request, or None to let the WebSocket handshake go on."""
        url = urlsplit(request.path)
        path = url.path
        if path == WS_PATH and request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            ready = await self.app.ready()
            return json_response(200 if ready else 503, {"status": "ok" if ready else "not ready"})
        if path == "/" or path.startswith("/static/"):
            return self.static(path)
        if path.startswith("/api/"):
            if owner is None:
                return error_response(401, "unauthorized", "a valid bearer token is required")
            return await self.api(path, parse_qs(url.query), owner)
        if path == WS_PATH:
            return error_response(400, "bad_request", "this endpoint takes WebSocket upgrades")
        return error_response(404, "not_found", "no such route")

    async def api(self, path: str, query: dict[str, list[str]], owner: str) -> Response:
        parts = path.strip("/").split("/")
        store = self.app.store
        if len(parts) == 4 and parts[:2] == ["api", "conversations"] and parts[3] == "export":
            return await self.export(parts[2], query, owner)
        try:
            limit = min(int(query.get("limit", ["50"])[0]), self.app.settings.history_page_max)
            before_seq_raw = query.get("before_seq", [None])[0]
            before_seq = int(before_seq_raw) if before_seq_raw is not None else None
        except ValueError:
            return error_response(400, "bad_frame", "limit and before_seq must be integers")
        if limit < 1 or (before_seq is not None and before_seq < 0):
            return error_response(400, "bad_frame", "limit must be >= 1 and before_seq >= 0")
        if parts == ["api", "conversations"]:
            before = query.get("before", [None])[0]
            convs, more = await store.conversations(owner=owner, before=before, limit=limit)
            return json_response(
                200,
                {
                    "items": [conversation_view(c).model_dump(mode="json") for c in convs],
                    "has_more": more,
                },
            )
        if len(parts) == 4 and parts[:2] == ["api", "conversations"] and parts[3] == "messages":
            conversation_id = parts[2]
            if await store.get_conversation(conversation_id, owner=owner) is None:
                return error_response(404, "not_found", "no such conversation")
            rows, more = await store.messages(conversation_id, before_seq=before_seq, limit=limit)
            return json_response(
                200,
                {
                    "conversation_id": conversation_id,
                    "messages": [
                        message_view(r).model_dump(mode="json", exclude_none=True) for r in rows
                    ],
                    "has_more": more,
                },
            )
        return error_response(404, "not_found", "no such route")

    async def export(
        self, conversation_id: str, query: dict[str, list[str]], owner: str
    ) -> Response:
        """The whole conversation as a JSON or Markdown attachment."""
        fmt = query.get("format", ["json"])[0]
        if fmt not in export.FORMATS:
            return error_response(400, "bad_frame", "format must be json or md")
        store = self.app.store
        conv = await store.get_conversation(conversation_id, owner=owner)
        if conv is None:
            return error_response(404, "not_found", "no such conversation")
        rows: list[Any] = []
        while True:
            page, more = await store.messages(
                conversation_id, after_seq=rows[-1].seq if rows else 0, limit=500
            )
            rows.extend(page)
            if not more or not page:
                break
        body = export.render(conv, rows, fmt)
        disposition = f'attachment; filename="{export.filename(conv, fmt)}"'
        return respond(200, body, export.content_type(fmt), (("Content-Disposition", disposition),))

    def static(self, path: str) -> Response:
        root = self.app.settings.static_dir.resolve()
        relative = "index.html" if path == "/" else path.removeprefix("/static/")
        target = (root / relative).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return error_response(404, "not_found", "no such file")
        content_type = _content_type(target)
        extra: tuple[tuple[str, str], ...] = ()
        if target.suffix == ".html":
            extra = (("Content-Security-Policy", _PAGE_CSP), ("X-Frame-Options", "DENY"))
        return respond(200, target.read_bytes(), content_type, extra)


def _content_type(path: Path) -> str:
    if path.suffix in (".js", ".mjs"):
        return "text/javascript; charset=utf-8"
    guessed = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
