"""HTTP answers on the WebSocket's port: JSON bodies, errors, and the security headers."""

from __future__ import annotations

import json
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Response

from ..auth.gate import Refusal

_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
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


def refusal_response(refusal: Refusal) -> Response:
    """The gate's refusal as the answer the client gets."""
    response = error_response(refusal.status, refusal.code, refusal.message)
    if refusal.challenge is not None:
        response.headers["WWW-Authenticate"] = refusal.challenge
    return response
