"""Read-only HTTP on the WebSocket's port: health, history JSON and the static chat page.

Served from websockets' `process_request` hook, so one port and one process serve both.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from websockets.http11 import Request, Response

from ..config import Settings
from ..errors import BadFrame, NotFound, ProtocolError
from ..pipeline import export
from ..pipeline.reads import Reads
from .responses import error_response, json_response, respond

WS_PATH = "/ws"
MAX_SEQ = 2**53  # as in the protocol: what a JSON number holds exactly, and any database
_PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class HttpRoutes:
    """GET routes: health, readiness, the page and its files, and the read-only API."""

    def __init__(
        self, *, settings: Settings, reads: Reads, ready: Callable[[], Awaitable[bool]]
    ) -> None:
        self.settings = settings
        self.reads = reads
        self.ready = ready

    async def handle(self, request: Request, owner: str | None) -> Response | None:
        """A response for an HTTP request, or None to let the WebSocket handshake go on."""
        url = urlsplit(request.path)
        path = url.path
        if path == WS_PATH and request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            ready = await self.ready()
            return json_response(200 if ready else 503, {"status": "ok" if ready else "not ready"})
        if path == "/" or path.startswith("/static/"):
            return self.static(path)
        if path.startswith("/api/"):
            if owner is None:
                return error_response(401, "unauthorized", "a valid bearer token is required")
            try:
                return await self.api(path, parse_qs(url.query), owner)
            except NotFound:
                return error_response(404, "not_found", "no such conversation")
        if path == WS_PATH:
            return error_response(400, "bad_request", "this endpoint takes WebSocket upgrades")
        return error_response(404, "not_found", "no such route")

    async def api(self, path: str, query: dict[str, list[str]], owner: str) -> Response:
        parts = path.strip("/").split("/")
        if parts == ["api", "search"]:
            return await self.search(query, owner)
        if len(parts) == 3 and parts[:2] == ["api", "attachments"]:
            return await self.attachment(parts[2], owner)
        if len(parts) == 4 and parts[:2] == ["api", "conversations"] and parts[3] == "export":
            return await self.export(parts[2], query, owner)
        try:
            limit = min(int(query.get("limit", ["50"])[0]), self.settings.history_page_max)
            before_seq_raw = query.get("before_seq", [None])[0]
            before_seq = int(before_seq_raw) if before_seq_raw is not None else None
            around_raw = query.get("around_seq", [None])[0]  # opening a search hit
            around_seq = int(around_raw) if around_raw is not None else None
        except ValueError:
            return error_response(
                400, "bad_frame", "limit, before_seq and around_seq must be integers"
            )
        seqs = [s for s in (before_seq, around_seq) if s is not None]
        if limit < 1 or not all(0 <= s <= MAX_SEQ for s in seqs):
            return error_response(
                400, "bad_frame", f"limit must be >= 1 and seqs from 0 to {MAX_SEQ}"
            )
        if parts == ["api", "conversations"]:
            before = query.get("before", [None])[0]
            items, more = await self.reads.conversations(owner, before=before, limit=limit)
            return json_response(
                200,
                {"items": [c.model_dump(mode="json") for c in items], "has_more": more},
            )
        if len(parts) == 4 and parts[:2] == ["api", "conversations"] and parts[3] == "messages":
            conversation_id = parts[2]
            views, more = await self.reads.history(
                owner,
                conversation_id,
                before_seq=before_seq,
                limit=limit,
                leaf_id=query.get("leaf_id", [None])[0],
                around_seq=around_seq,
            )
            return json_response(
                200,
                {
                    "conversation_id": conversation_id,
                    "messages": [v.model_dump(mode="json", exclude_none=True) for v in views],
                    "has_more": more,
                },
            )
        return error_response(404, "not_found", "no such route")

    async def search(self, query: dict[str, list[str]], owner: str) -> Response:
        """`GET /api/search?q=...`: the `search` frame over HTTP (docs/search.md)."""

        def one(name: str) -> str | None:
            return query.get(name, [None])[0]

        try:
            limit = int(one("limit") or "20")
            if limit < 1:
                raise BadFrame("limit must be >= 1")
            items, next_cursor = await self.reads.search(
                owner,
                query=one("q") or "",
                limit=limit,
                **{k: one(k) for k in ("cursor", "conversation_id", "role", "after", "before")},
            )
        except ValueError:
            return error_response(400, "bad_frame", "limit must be an integer")
        except ProtocolError as exc:
            return error_response(413 if exc.code == "too_large" else 400, exc.code, exc.message)
        return json_response(
            200, {"items": [i.model_dump(mode="json") for i in items], "next_cursor": next_cursor}
        )

    async def export(
        self, conversation_id: str, query: dict[str, list[str]], owner: str
    ) -> Response:
        """The whole conversation as a JSON or Markdown attachment."""
        fmt = query.get("format", ["json"])[0]
        if fmt not in export.FORMATS:
            return error_response(400, "bad_frame", "format must be json or md")
        conv, rows = await self.reads.whole_conversation(owner, conversation_id)
        files = await self.reads.attachments_of(rows)
        data: dict[str, bytes] | None = None
        if query.get("attachments", ["0"])[0] == "1" and fmt == "json" and self.reads.files:
            ids = {a.id for views in files.values() for a in views}
            data = {i: await self.reads.files.store.read(i) for i in sorted(ids)}
        body = export.render(conv, rows, fmt, attachments=files, data=data)
        disposition = f'attachment; filename="{export.filename(conv, fmt)}"'
        return respond(200, body, export.content_type(fmt), (("Content-Disposition", disposition),))

    async def attachment(self, attachment_id: str, owner: str) -> Response:
        """An attachment's bytes, to its owner only. Images go out with their sniffed type;
        everything else (an SVG included: it is text here) as a download, so a browser never
        runs a file someone uploaded."""
        files = self.reads.files
        row = await files.store.get(attachment_id, owner=owner) if files is not None else None
        if files is None or row is None:
            return error_response(404, "not_found", "no such attachment")
        body = await files.store.read(row.id)
        disposition = "inline" if row.kind == "image" else "attachment"
        content_type = row.content_type if row.kind == "image" else _download_type(row.kind)
        ascii_name = re.sub(r"[^A-Za-z0-9._-]+", "_", row.filename)[:100] or "file"
        headers = (
            (
                "Content-Disposition",
                f"{disposition}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(row.filename)}",
            ),
            ("Content-Security-Policy", "default-src 'none'; sandbox"),
        )
        return respond(200, body, content_type, headers)

    def static(self, path: str) -> Response:
        root = self.settings.static_dir.resolve()
        relative = "index.html" if path == "/" else path.removeprefix("/static/")
        try:
            target = (root / relative).resolve()
            found = target.is_relative_to(root) and target.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            return error_response(404, "not_found", "no such file")
        content_type = _content_type(target)
        extra: tuple[tuple[str, str], ...] = ()
        if target.suffix == ".html":
            extra = (("Content-Security-Policy", _PAGE_CSP), ("X-Frame-Options", "DENY"))
        return respond(200, target.read_bytes(), content_type, extra)


def _download_type(kind: str | None) -> str:
    return "application/pdf" if kind == "pdf" else "text/plain; charset=utf-8"


def _content_type(path: Path) -> str:
    if path.suffix in (".js", ".mjs"):
        return "text/javascript; charset=utf-8"
    guessed = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed
