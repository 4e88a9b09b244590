"""The gate in front of `/ws` and `/api/`: Host and Origin checks, the token, 401/403 answers.

It runs in websockets' `process_request`, so a refused client gets a plain HTTP answer before any
upgrade and never reaches the router. Also here: the log filter that keeps tokens out of logs,
and a log of auth failures that cannot be flooded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request

from ..errors import CortexError
from .tokens import LOCAL, AuthConfigError, Authenticator, Principal, is_loopback

log = logging.getLogger("cortex.access")

ACCESS_TOKEN_PARAM = "access_token"
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_UNAUTHORIZED = ("unauthorized", "a valid bearer token is required")


class OriginPolicy:
    """Which browser pages may open a WebSocket (defence against cross-site WebSocket hijacking).

    No `Origin` header (a non-browser client) passes: such a client can send any header anyway,
    and the token is what keeps it out. `*` allows every origin. Otherwise the page's origin must
    be this server's own (its host:port equals the request's Host) or one of `allowed`.
    """

    def __init__(self, allowed: Sequence[str]) -> None:
        self.any = "*" in allowed
        self.allowed: set[str] = set()
        for entry in allowed:
            if entry == "*":
                continue
            normal = "null" if entry == "null" else normalise_origin(entry)
            if normal is None:
                raise AuthConfigError(
                    f"CORTEX_ALLOWED_ORIGINS: {entry!r} is not an origin such as "
                    "https://chat.example.com or http://localhost:8080 (or *)"
                )
            self.allowed.add(normal)

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any:
            return True
        if origin.strip() == "null":
            return "null" in self.allowed  # sandboxed frames and file:// pages
        normal = normalise_origin(origin)
        if normal is None:
            return False
        return normal in self.allowed or _same_origin(normal, host)


def normalise_origin(value: str) -> str | None:
    """`scheme://host[:port]` in lower case without a default port, or None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def _same_origin(origin: str, host_header: str | None) -> bool:
    if not host_header:
        return False
    parts = urlsplit(origin)
    default = _DEFAULT_PORTS[parts.scheme]
    host, port = _split_host(host_header)
    if host is None:
        return False
    return parts.hostname == host and (parts.port or default) == (port or default)


def _split_host(value: str) -> tuple[str | None, int | None]:
    """A Host header as (lower-case name, port or None); (None, None) if malformed."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        return (parts.hostname or None), parts.port
    except ValueError:
        return None, None


def host_name(headers: Headers) -> str | None:
    """The name in the single Host header, or None."""
    values = headers.get_all("Host")
    return _split_host(values[0])[0] if len(values) == 1 else None


def single(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once; a repeated one counts as absent."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else None


def presented_token(request: Request, *, allow_query: bool) -> str | None:
    """The bearer token of a request: the `Authorization` header, else (for WebSocket upgrades
    from browsers, which cannot set headers) the `access_token` query parameter.

    Only the literal parameter name counts (not a percent-encoded spelling of it), so that the
    log scrubber, which looks for `access_token=`, recognises every token that works.
    """
    header = request.headers.get_all("Authorization")
    if header:
        if len(header) > 1:
            return None
        scheme, _, value = header[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return value.strip() or None
    if not allow_query:
        return None
    pairs = (part.partition("=") for part in urlsplit(request.path).query.split("&"))
    found = [unquote(value) for key, _, value in pairs if key == ACCESS_TOKEN_PARAM]
    if len(found) != 1:
        return None
    return found[0] or None


class FailureLog:
    """Logs refused requests (never the token), at most `burst` lines per `window` seconds; the
    rest are counted and reported when the window ends, so a flood cannot fill the disk."""

    def __init__(self, *, window: float = 60.0, burst: int = 20) -> None:
        self.window, self.burst = window, burst
        self._start = time.monotonic()
        self._logged = 0
        self._suppressed = 0

    def record(self, remote: str, reason: str, path: str) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                log.warning(
                    "%d more refused requests in the last %.0fs were not logged one by one",
                    self._suppressed,
                    now - self._start,
                )
            self._start, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self.burst:
            self._suppressed += 1
            return
        self._logged += 1
        log.warning("refused %s from %s: %s", path, remote, reason)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not proceed, as the HTTP answer the server turns it into."""

    status: int
    code: str
    message: str
    challenge: str | None = None  # a WWW-Authenticate value, for 401


class Gate:
    """Decides, before any upgrade, whether a request to `/ws` or `/api/` may proceed."""

    def __init__(
        self,
        authenticator: Authenticator,
        origins: OriginPolicy,
        *,
        loopback_hosts_only: bool,
    ) -> None:
        self.authenticator = authenticator
        self.origins = origins
        # With auth off because the server is bound to loopback, a page on another site could
        # still reach it through DNS rebinding (its own name resolving to 127.0.0.1); such a
        # request carries that site's name in Host, so only loopback names are let through.
        self.loopback_hosts_only = loopback_hosts_only
        self.failures = FailureLog()

    async def check(self, request: Request, remote: str, *, websocket: bool) -> Principal | Refusal:
        path = urlsplit(request.path).path  # never the query: it may hold a token
        headers = request.headers
        if self.loopback_hosts_only and not _loopback_name(host_name(headers)):
            self.failures.record(remote, "Host is not a loopback name while auth is off", path)
            return Refusal(
                403,
                "forbidden",
                "auth is off because Cortex is bound to loopback; use http://localhost or "
                "http://127.0.0.1, or configure tokens",
            )
        origins = headers.get_all("Origin")
        if len(origins) > 1 or not self.origins.allows(
            origins[0] if origins else None, single(headers, "Host")
        ):
            self.failures.record(remote, "foreign Origin", path)
            return Refusal(403, "forbidden", "this origin may not connect")
        if not self.authenticator.required:
            return LOCAL
        token = presented_token(request, allow_query=websocket)
        try:
            principal = await self.authenticator.authenticate(token)
        except CortexError:
            log.warning("could not check a token: the tokens table is unreachable", exc_info=True)
            return Refusal(503, "unavailable", "cannot check credentials right now")
        if principal is None:
            self.failures.record(remote, "invalid token" if token else "no token", path)
            return Refusal(401, *_UNAUTHORIZED, challenge='Bearer realm="cortex"')
        return principal


def _loopback_name(name: str | None) -> bool:
    return name is not None and is_loopback(name)
