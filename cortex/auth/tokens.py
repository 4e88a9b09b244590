"""Who is asking: bearer tokens, the auth mode, and the start-up checks that refuse unsafe setups.

Tokens are compared by their sha256 digest only. Stored tokens are looked up by the digest of the
presented token (timing then depends on the digest, which tells an attacker nothing about a token)
and checked again with `hmac.compare_digest`; tokens from `CORTEX_AUTH_TOKENS` are compared with
`hmac.compare_digest` against every configured digest, without stopping at the first match.
No message raised or logged here ever contains a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from ..config import Settings
from ..errors import CortexError, StartupError

log = logging.getLogger("cortex.auth")

LOCAL_USER = "local"
"""The one user of a server that runs without auth."""

TOKEN_PREFIX = "ctx_"
"""Marks Cortex tokens, so that secret scanners and people can tell what a leaked string is."""

STORED_TOKEN_CHARS = len(TOKEN_PREFIX) + 43  # secrets.token_urlsafe(32) is 43 characters
MIN_ENV_TOKEN_CHARS = 32
"""Shortest token `CORTEX_AUTH_TOKENS` accepts: `openssl rand -hex 16` is 32 characters."""

MAX_USER_CHARS = 128  # conversations.owner and tokens.user are String(128)
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
_TOUCH_EVERY_S = 60.0  # last_used_at is a hint, not an audit log: one write a minute per token


class AuthConfigError(StartupError):
    """The access settings are invalid or unsafe; the server refuses to start."""

    code = "auth_config"


@dataclass(frozen=True, slots=True)
class Principal:
    """The user a connection speaks for, and which credential said so."""

    user: str
    via: str = "local"  # "local" (auth off), "env" (CORTEX_AUTH_TOKENS) or "stored"
    token_id: int | None = None  # a stored token's id, so that its revocation can end sessions


LOCAL = Principal(LOCAL_USER)


def generate_token() -> str:
    """A new token: 32 random bytes, urlsafe base64, with the `ctx_` prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 hex digest kept in place of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_user(user: str) -> str:
    """A user name as stored: letters, digits and `._@+-`, at most 128 characters.

    The name ends up in logs and in the `owner` column, so control characters, spaces and
    separators are refused rather than escaped.
    """
    if not (len(user) <= MAX_USER_CHARS and _USER.fullmatch(user)):
        raise ValueError(
            f"invalid user name {user[:MAX_USER_CHARS]!r}: use letters, digits and ._@+- "
            f"(starting with a letter or digit), at most {MAX_USER_CHARS} characters"
        )
    return user


def parse_env_tokens(raw: str) -> dict[str, str]:
    """`token:user,token:user` -> {sha256 hex digest: user}.

    Refuses, naming the entry by position and never echoing it: a missing user, a bad user name,
    a token shorter than `MIN_ENV_TOKEN_CHARS`, and the same token given twice.
    """
    tokens: dict[str, str] = {}
    for position, entry in enumerate(raw.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        token, sep, user = entry.rpartition(":")
        token, user = token.strip(), user.strip()
        where = f"CORTEX_AUTH_TOKENS entry {position}"
        if not sep or not token or not user:
            raise AuthConfigError(f"{where} is not of the form token:user")
        try:
            check_user(user)
        except ValueError as exc:
            raise AuthConfigError(f"{where}: {exc}") from None
        if len(token) < MIN_ENV_TOKEN_CHARS:
            raise AuthConfigError(
                f"{where} (user {user!r}): the token is shorter than {MIN_ENV_TOKEN_CHARS} "
                "characters; generate one with `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'` or use `cortex token create`"
            )
        digest = hash_token(token)
        if digest in tokens:
            raise AuthConfigError(f"{where} (user {user!r}) repeats the token of an earlier entry")
        tokens[digest] = user
    return tokens


def is_loopback(host: str) -> bool:
    """Whether a bind address (or a Host header's name) only reaches this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere, so it counts as public


def auth_required(settings: Settings, *, env_tokens: int, stored_tokens: int) -> bool:
    """Decide at start-up whether clients must present a token, or refuse to start.

    auto: off only on a loopback address with no token configured or stored.
    token: always on. none: off, on purpose (a loud warning is logged).
    Refuses a non-loopback address with auth required and no token to present.
    """
    mode, host = settings.auth, settings.host
    available = env_tokens + stored_tokens
    if mode == "none":
        log.warning(
            "CORTEX_AUTH=none: authentication is OFF. Anyone who can reach %s:%d reads and "
            "writes every conversation as user %r.%s%s",
            host,
            settings.port,
            LOCAL_USER,
            "" if is_loopback(host) else " This address is reachable from other machines!",
            " Configured tokens are ignored." if available else "",
        )
        return False
    if mode == "auto" and is_loopback(host) and not available:
        log.info(
            "auth is off: bound to loopback %s with no token configured, every client is user "
            "%r. Set CORTEX_AUTH_TOKENS or run `cortex token create USER` to require tokens.",
            host,
            LOCAL_USER,
        )
        return False
    if not available:
        if not is_loopback(host):
            raise AuthConfigError(
                f"refusing to serve on {host}, which other machines can reach, without "
                "authentication: no token is configured. Set CORTEX_AUTH_TOKENS=token:user, or "
                "run `cortex token create USER`, or bind CORTEX_HOST=127.0.0.1, or set "
                "CORTEX_AUTH=none if something in front of Cortex authenticates clients."
            )
        log.warning(
            "CORTEX_AUTH=token but no token exists yet: every connection is refused until you "
            "run `cortex token create USER`"
        )
    log.info(
        "auth is on: bearer tokens required (%d from CORTEX_AUTH_TOKENS, %d stored)",
        env_tokens,
        stored_tokens,
    )
    return True


class StoredToken(Protocol):
    id: int
    user: str
    token_hash: str


class TokenLookup(Protocol):
    """What the authenticator needs from the `tokens` table (`store.TokenStore`)."""

    async def find_active(self, token_hash: str) -> StoredToken | None: ...

    async def touch(self, token_id: int) -> None: ...


class Authenticator:
    """Maps a presented token to a `Principal`, or None. Nothing is cached: a revoked token is
    refused on the very next handshake, even when another process (the CLI) revoked it."""

    def __init__(
        self, *, required: bool, env_tokens: dict[str, str], store: TokenLookup | None
    ) -> None:
        self.required = required
        self._env = [(bytes.fromhex(digest), user) for digest, user in env_tokens.items()]
        self._store = store
        self._touched: dict[int, float] = {}

    async def authenticate(self, token: str | None) -> Principal | None:
        if not self.required:
            return LOCAL
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        user = self._match_env(digest)
        if user is not None:
            return Principal(user, via="env")
        # Only strings shaped like our tokens reach the database, which bounds the work a flood
        # of junk tokens can cause.
        if self._store is None or not _looks_stored(token):
            return None
        row = await self._store.find_active(digest.hex())
        if row is None or not hmac.compare_digest(row.token_hash, digest.hex()):
            return None
        await self._touch(row.id)
        return Principal(row.user, via="stored", token_id=row.id)

    def _match_env(self, digest: bytes) -> str | None:
        found: str | None = None
        for candidate, user in self._env:
            if hmac.compare_digest(candidate, digest):
                found = user  # no early exit: the time taken does not depend on the position
        return found

    async def _touch(self, token_id: int) -> None:
        now = time.monotonic()
        if now - self._touched.get(token_id, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
            return
        self._touched[token_id] = now
        try:
            assert self._store is not None
            await self._store.touch(token_id)
        except CortexError:
            log.warning("could not record the last use of token %d", token_id, exc_info=True)


def _looks_stored(token: str) -> bool:
    return len(token) == STORED_TOKEN_CHARS and token.startswith(TOKEN_PREFIX)
