"""The gate's pure parts: origins, Host names, where a token is read from, log scrubbing."""

from __future__ import annotations

import logging
import sys

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from cortex.auth.gate import Gate, OriginPolicy, Refusal, normalise_origin, presented_token
from cortex.auth.tokens import (
    MIN_ENV_TOKEN_CHARS,
    AuthConfigError,
    Authenticator,
    Principal,
    check_user,
    generate_token,
    hash_token,
    is_loopback,
    parse_env_tokens,
)
from cortex.ops.scrubber import TokenScrubber, scrub
from cortex.store.repo import StoreError


def request(path: str = "/ws", *headers: tuple[str, str]) -> Request:
    return Request(path, Headers(list(headers)))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://Chat.Example.com", "https://chat.example.com"),
        ("https://chat.example.com:443/", "https://chat.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8765", "http://[::1]:8765"),
        ("chat.example.com", None),
        ("ftp://chat.example.com", None),
        ("https://chat.example.com/path", None),
        ("https://user@chat.example.com", None),
        ("https://chat.example.com:99999", None),
    ],
)
def test_normalise_origin(raw: str, expected: str | None) -> None:
    assert normalise_origin(raw) == expected


def test_same_origin_by_default() -> None:
    policy = OriginPolicy([])
    assert policy.allows(None, "127.0.0.1:8765")  # not a browser
    assert policy.allows("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert policy.allows("https://chat.example.com", "chat.example.com")  # behind TLS proxy
    assert policy.allows("http://chat.example.com", "chat.example.com:80")
    assert not policy.allows("http://chat.example.com", "chat.example.com:8765")
    assert not policy.allows("https://chat.example.com.evil.example", "chat.example.com")
    assert not policy.allows("http://localhost:8765", "127.0.0.1:8765")
    assert not policy.allows("http://127.0.0.1:8765", None)
    assert not policy.allows("null", "127.0.0.1:8765")
    assert not policy.allows("garbage", "127.0.0.1:8765")


def test_listed_and_wildcard_origins() -> None:
    policy = OriginPolicy(["https://chat.example.com", "null"])
    assert policy.allows("https://CHAT.example.com:443", "127.0.0.1:8765")
    assert policy.allows("null", "127.0.0.1:8765")
    assert policy.allows("http://127.0.0.1:8765", "127.0.0.1:8765")  # same origin still works
    assert not policy.allows("https://evil.example", "127.0.0.1:8765")
    assert OriginPolicy(["*"]).allows("https://evil.example", "127.0.0.1:8765")
    with pytest.raises(AuthConfigError, match="not an origin"):
        OriginPolicy(["chat.example.com"])


def test_presented_token_sources() -> None:
    def token(path: str, *headers: tuple[str, str], query: bool = True) -> str | None:
        return presented_token(request(path, *headers), allow_query=query)

    assert token("/ws", ("Authorization", "Bearer abc")) == "abc"
    assert token("/ws", ("authorization", "bearer  abc ")) == "abc"
    assert presented_token(request("/ws?access_token=a%2Bb"), allow_query=True) == "a+b"
    assert presented_token(request("/ws?access_token=abc"), allow_query=False) is None
    assert presented_token(request("/ws?access%5Ftoken=abc"), allow_query=True) is None
    assert presented_token(request("/ws?access_token=a&access_token=b"), allow_query=True) is None
    assert presented_token(request("/ws?access_token="), allow_query=True) is None
    header_wins = request("/ws?access_token=q", ("Authorization", "Bearer h"))
    assert presented_token(header_wins, allow_query=True) == "h"
    basic = request("/ws?access_token=q", ("Authorization", "Basic h"))
    assert presented_token(basic, allow_query=True) is None  # a bad header is not skipped
    twice = request("/ws", ("Authorization", "Bearer a"), ("Authorization", "Bearer a"))
    assert presented_token(twice, allow_query=True) is None


def test_env_tokens_are_kept_as_digests() -> None:
    token = "t" * MIN_ENV_TOKEN_CHARS
    other = "u" * 40 + ":x"  # a colon in the token: the user is after the last one
    parsed = parse_env_tokens(f" {token}:alice , ,{other}:bob")
    assert parsed == {hash_token(token): "alice", hash_token(other): "bob"}
    assert token not in repr(parsed)


def test_user_names_and_loopback() -> None:
    assert check_user("alice.smith+cortex@example.com") == "alice.smith+cortex@example.com"
    for bad in ("", " alice", "al\nice", "-x", "a" * 129, "alice:bob"):
        with pytest.raises(ValueError):
            check_user(bad)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"))


def test_generated_tokens() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("ctx_") and len(t) == 47 for t in tokens)
    assert len(hash_token(tokens.pop())) == 64


def test_scrub() -> None:
    token = generate_token()
    lines = [
        f"< GET /ws?access_token={token} HTTP/1.1",
        f"< GET /ws?a=1&ACCESS_TOKEN={token}&b=2 HTTP/1.1",
        f"< Authorization: Bearer {token}",
        f"header authorization={token}",
        f"sent bearer {token}, then left",
        f"a stray {token} in a message",
    ]
    for line in lines:
        assert token not in scrub(line)
        assert token[4:20] not in scrub(line)
    assert scrub("GET /ws?a=1&access_token=x&b=2").endswith("access_token=[redacted]&b=2")
    assert scrub("nothing to see") == "nothing to see"
    for prose in ("bearer tokens required", 'WWW-Authenticate: Bearer realm="cortex"'):
        assert scrub(prose) == prose


def test_scrubber_filter_rewrites_messages_and_tracebacks() -> None:
    token = generate_token()
    try:
        raise ValueError(f"bad path /ws?access_token={token}")
    except ValueError:
        record = logging.LogRecord(
            "t",
            logging.ERROR,
            __file__,
            1,
            "< GET %s",
            (f"/ws?access_token={token}",),
            sys.exc_info(),
        )
    assert TokenScrubber().filter(record)
    text = logging.Formatter().format(record)
    assert token not in text and "access_token=[redacted]" in text


class _BrokenStore:
    async def find_active(self, token_hash: str) -> None:
        raise StoreError("database error: OperationalError")

    async def touch(self, token_id: int) -> None:
        raise AssertionError("not reached")


async def test_gate_answers_503_when_the_tokens_table_is_unreachable() -> None:
    env = parse_env_tokens("e" * 40 + ":eve")
    gate = Gate(
        Authenticator(required=True, env_tokens=env, store=_BrokenStore()),
        OriginPolicy([]),
        loopback_hosts_only=False,
    )
    host = ("Host", "127.0.0.1:1")
    stored = request("/ws", host, ("Authorization", f"Bearer {generate_token()}"))
    verdict = await gate.check(stored, "127.0.0.1", websocket=True)
    assert isinstance(verdict, Refusal) and verdict.status == 503
    # Tokens from the environment need no database; other strings never reach it.
    by_env = request("/ws", host, ("Authorization", "Bearer " + "e" * 40))
    assert await gate.check(by_env, "127.0.0.1", websocket=True) == Principal("eve", via="env")
    junk = await gate.check(request("/ws?access_token=junk", host), "127.0.0.1", websocket=True)
    assert isinstance(junk, Refusal) and junk.status == 401
