"""Users and access: tokens, ownership, the handshake gate, start-up refusals, the token CLI.

Against the real server on port 0 with real clients. This module's `settings` fixture overrides
the one in conftest, so `server`, `connect_client` and `http` here require tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, Client, final_message, make_settings
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cortex import cli
from cortex.app import Cortex, running
from cortex.auth.tokens import LOCAL_USER, AuthConfigError, generate_token, hash_token
from cortex.config import Settings
from cortex.testing.fake_openai import FakeOpenAI, Reply

ALICE = "alice-" + "A1" * 20
BOB = "bob-" + "B2" * 20


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOpenAI) -> Settings:
    return make_settings(
        tmp_path, provider, auth_tokens=f"{ALICE}:alice, {BOB}:bob", auth_recheck_s=0.05
    )


async def refused(url: str, **kwargs: Any) -> InvalidStatus:
    """The HTTP refusal of a WebSocket handshake (fails the test if it is accepted)."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, open_timeout=TIMEOUT, **kwargs):
            pass
    return info.value


async def answers_ping(url: str, **kwargs: Any) -> bool:
    async with connect(url, open_timeout=TIMEOUT, **kwargs) as ws:
        return (await Client(ws).request(type="ping"))["type"] == "pong"


async def new_conversation(client: Client, content: str, **extra: Any) -> str:
    await client.send(type="send", content=content, **extra)
    conversation_id: str = (await client.until_type("ack"))[-1]["conversation_id"]
    return conversation_id


def without_ids(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("request_id", "conversation_id")}


# ---- ownership -----------------------------------------------------------------------------


async def test_each_user_sees_only_their_own_conversations(
    connect_client: Callable[..., Any], provider: FakeOpenAI, http: Any
) -> None:
    provider.enqueue(Reply(text="for alice"), Reply(text="for bob"))
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    bob: Client = await connect_client(additional_headers=bearer(BOB))
    mine = await new_conversation(alice, "alice's secret")
    await alice.until_reply()
    theirs = await new_conversation(bob, "bob's secret")
    await bob.until_reply()

    assert [c["id"] for c in (await alice.request(type="conversations"))["items"]] == [mine]
    assert [c["id"] for c in (await bob.request(type="conversations"))["items"]] == [theirs]
    status, body = await http("/api/conversations", headers=bearer(ALICE))
    assert status == 200 and [c["id"] for c in body["items"]] == [mine]
    status, body = await http(f"/api/conversations?before={mine}", headers=bearer(BOB))
    assert status == 200 and [c["id"] for c in body["items"]] == [theirs]

    status, body = await http(f"/api/conversations/{mine}/messages", headers=bearer(ALICE))
    assert status == 200 and body["messages"][0]["content"] == "alice's secret"
    status, body = await http(f"/api/conversations/{mine}/messages", headers=bearer(BOB))
    unknown = await http("/api/conversations/no-such-id/messages", headers=bearer(BOB))
    assert (status, body) == unknown and status == 404
    assert body["error"]["code"] == "not_found"


async def test_another_users_conversation_answers_not_found(
    connect_client: Callable[..., Any], provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text="never ending", chunks=4, stall_after=1), Reply(text="bob's own"))
    alice: Client = await connect_client(additional_headers=bearer(ALICE))
    bob: Client = await connect_client(additional_headers=bearer(BOB))
    target = await new_conversation(alice, "alice only", client_msg_id="m-1")
    await alice.until_type("delta")  # alice's reply is streaming (and stalls)

    probes: list[dict[str, Any]] = [
        {"type": "subscribe", "after_seq": 0},
        {"type": "history"},
        {"type": "cancel"},
        {"type": "send", "content": "let me in"},
        {"type": "send", "content": "retry", "client_msg_id": "m-1"},
    ]
    for probe in probes:
        answer = await bob.request(**probe, conversation_id=target)
        guess = await bob.request(**probe, conversation_id="0" * 32)
        assert answer["type"] == "error" and answer["code"] == "not_found", (probe, answer)
        assert without_ids(answer) == without_ids(guess)  # nothing tells the two apart

    # Reusing alice's client_msg_id without a conversation starts bob's own, never re-acks hers.
    own = await new_conversation(bob, "mine", client_msg_id="m-1")
    assert own != target
    await bob.until_reply()
    leaked = [
        e
        for e in bob.seen
        if (e.get("conversation_id") == target and e["type"] != "error")
        or "alice only" in json.dumps(e)
    ]
    assert leaked == []

    # Bob's cancel did nothing: alice's reply is still streaming until she cancels it herself.
    assert (await alice.request(type="ping"))["type"] == "pong"
    assert not [
        e
        for e in alice.seen
        if e["type"] == "message"
        and e["message"]["role"] == "assistant"
        and e["message"]["status"] != "streaming"
    ]
    await alice.send(type="cancel", conversation_id=target)
    assert final_message(await alice.until_reply())["status"] == "cancelled"
    history = await alice.request(type="history", conversation_id=target)
    assert [m["content"] for m in history["messages"] if m["role"] == "user"] == ["alice only"]


# ---- refusals ------------------------------------------------------------------------------


async def test_missing_wrong_and_malformed_tokens_get_401_before_the_upgrade(
    server: Cortex, http: Any
) -> None:
    bodies = set()
    for headers in (
        None,
        bearer("x" * 47),
        bearer(generate_token()),  # well-formed, but never issued
        bearer(ALICE[:-1]),
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": f"Bearer{ALICE}"},
        [("Authorization", f"Bearer {ALICE}"), ("Authorization", f"Bearer {ALICE}")],
    ):
        refusal = await refused(server.url, additional_headers=headers)
        assert refusal.response.status_code == 401, headers
        assert refusal.response.headers["WWW-Authenticate"].startswith("Bearer")
        bodies.add(bytes(refusal.response.body))
    assert len(bodies) == 1  # one answer for every failure: nothing to enumerate
    assert json.loads(bodies.pop())["error"]["code"] == "unauthorized"
    refusal = await refused(f"{server.url}?access_token={BOB}x")
    assert refusal.response.status_code == 401
    # A percent-encoded parameter name is not the parameter (the log scrubber keys on the name).
    assert (await refused(f"{server.url}?access%5Ftoken={BOB}")).response.status_code == 401

    assert await answers_ping(f"{server.url}?access_token={BOB}")
    assert await answers_ping(server.url, additional_headers=bearer(ALICE))

    status, body = await http("/api/conversations")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, _ = await http(f"/api/conversations?access_token={ALICE}")
    assert status == 401  # HTTP routes take the header only: URLs end up in logs and history
    status, _ = await http("/api/conversations", headers=bearer(ALICE))
    assert status == 200
    for public in ("/", "/healthz", "/readyz"):
        status, _ = await http(public)
        assert status == 200, public


async def test_a_revoked_token_is_refused_at_once_and_its_sessions_are_closed(
    server: Cortex,
) -> None:
    token = generate_token()
    row = await server.tokens.create(user="carol", name="test", token_hash=hash_token(token))
    async with connect(server.url, additional_headers=bearer(token)) as ws:
        client = Client(ws)
        conversation_id = await new_conversation(client, "carol's")
        await client.until_reply()
        listing = await client.request(type="conversations")
        assert [c["id"] for c in listing["items"]] == [conversation_id]
        assert await server.tokens.revoke(row.id) is not None
        refusal = await refused(server.url, additional_headers=bearer(token))
        assert refusal.response.status_code == 401
        await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
        assert ws.close_code == 1008 and ws.close_reason == "token revoked"
    assert await answers_ping(server.url, additional_headers=bearer(ALICE))


async def test_tokens_never_reach_the_logs(
    server: Cortex, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # websockets logs paths and headers at DEBUG
    stored = generate_token()
    await server.tokens.create(user="dave", token_hash=hash_token(stored))
    wrong = "wrong-" + "z" * 40
    assert await answers_ping(f"{server.url}?access_token={ALICE}")
    assert await answers_ping(f"{server.url}?x=1&access_token={stored}")
    assert await answers_ping(server.url, additional_headers=bearer(BOB))
    await refused(f"{server.url}?access_token={wrong}")
    await refused(server.url, additional_headers=bearer(wrong))
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/api/conversations?access_token={stored}"
        async with session.get(url, headers=bearer(wrong)) as response:
            assert response.status == 401

    server_side = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    text = "\n".join(
        logging.Formatter("%(name)s %(message)s").format(record) for record in server_side
    )
    assert "access_token=[redacted]" in text  # websockets did log the path, scrubbed
    assert "Authorization: [redacted]" in text  # and the headers
    assert "refused /ws from 127.0.0.1: invalid token" in text
    for secret in (ALICE, BOB, stored, wrong, stored[4:]):
        assert secret not in text


# ---- origin and host -----------------------------------------------------------------------


async def test_origin_check_on_the_upgrade(server: Cortex, tmp_path: Path) -> None:
    port = server.port
    foreign = await refused(
        server.url, origin="https://evil.example", additional_headers=bearer(ALICE)
    )
    assert foreign.response.status_code == 403
    for lookalike in (f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}", "null"):
        refusal = await refused(server.url, origin=lookalike, additional_headers=bearer(ALICE))
        assert refusal.response.status_code == 403, lookalike
    assert await answers_ping(
        server.url, origin=f"http://127.0.0.1:{port}", additional_headers=bearer(ALICE)
    )
    # The origin is checked before the token, so a hijacking page learns nothing about it.
    assert (await refused(server.url, origin="https://evil.example")).response.status_code == 403

    listed = make_settings(
        tmp_path / "listed", allowed_origins="https://Chat.Example.com:443/, http://localhost:3000"
    )
    (tmp_path / "listed").mkdir()
    async with running(listed) as app:
        assert await answers_ping(app.url, origin="https://chat.example.com")
        assert await answers_ping(app.url, origin="http://localhost:3000")
        assert (await refused(app.url, origin="https://evil.example")).response.status_code == 403
    anything = make_settings(tmp_path / "any", allowed_origins="*")
    (tmp_path / "any").mkdir()
    async with running(anything) as app:
        assert await answers_ping(app.url, origin="https://evil.example")


async def test_without_auth_only_loopback_names_are_served(tmp_path: Path) -> None:
    """Auth off on loopback: a foreign page (CSRF-style, or DNS rebinding) gets nothing."""
    async with running(make_settings(tmp_path)) as app:
        assert await answers_ping(app.url)  # no token needed
        assert (await refused(app.url, origin="https://evil.example")).response.status_code == 403
        base = f"http://127.0.0.1:{app.port}"
        async with aiohttp.ClientSession() as session:
            for host, expected in (
                (f"localhost:{app.port}", 200),
                (f"127.0.0.1:{app.port}", 200),
                (f"rebound.evil.example:{app.port}", 403),
            ):
                headers = {"Host": host}
                async with session.get(f"{base}/api/conversations", headers=headers) as response:
                    assert response.status == expected, host
                if expected == 403:
                    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                        await session.ws_connect(f"{base}/ws", headers=headers)
                    assert info.value.status == 403
            async with session.get(f"{base}/", headers={"Host": "x.example"}) as response:
                assert response.status == 200  # the page itself is public


# ---- start-up ------------------------------------------------------------------------------


async def test_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    for mode in ("auto", "token"):
        with pytest.raises(AuthConfigError, match="refusing to serve on 0.0.0.0"):
            async with running(make_settings(tmp_path, host="0.0.0.0", auth=mode)):
                pass


async def test_auth_none_serves_a_public_address_with_a_loud_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with running(make_settings(tmp_path, host="0.0.0.0", auth="none")) as app:
        local = f"ws://127.0.0.1:{app.port}/ws"
        async with connect(local) as ws:
            client = Client(ws)
            await new_conversation(client, "open to all")
            await client.until_reply()
        rows, _ = await app.store.conversations(owner=LOCAL_USER)
        assert [r.title for r in rows] == ["open to all"]
    assert any(
        r.levelno == logging.WARNING and "authentication is OFF" in r.getMessage()
        for r in caplog.records
    )


async def test_tokens_make_a_public_address_and_loopback_require_them(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, host="0.0.0.0", auth_tokens=f"{ALICE}:alice")
    async with running(settings) as app:
        local = f"ws://127.0.0.1:{app.port}/ws"
        assert (await refused(local)).response.status_code == 401
        assert await answers_ping(local, additional_headers=bearer(ALICE))
    async with running(make_settings(tmp_path, auth="token")) as app:  # no token exists yet
        assert (await refused(app.url)).response.status_code == 401


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("tooshort:alice", "shorter than 32 characters"),
        (f"{ALICE}", "not of the form token:user"),
        (f"{ALICE}:", "not of the form token:user"),
        (f"{ALICE}:al ice", "invalid user name"),
        (f"{ALICE}:alice,{ALICE}:mallory", "repeats the token"),
    ],
)
async def test_bad_env_tokens_refuse_to_start_without_echoing_them(
    tmp_path: Path, raw: str, expected: str
) -> None:
    with pytest.raises(AuthConfigError, match=expected) as info:
        async with running(make_settings(tmp_path, auth_tokens=raw)):
            pass
    assert ALICE not in str(info.value) and "tooshort" not in str(info.value)
    assert ALICE not in repr(make_settings(tmp_path, auth_tokens=raw))


def test_cli_serve_on_a_public_address_without_auth_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli_env(tmp_path, monkeypatch)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0" in err and "CORTEX_AUTH=none" in err
    monkeypatch.setenv("CORTEX_AUTH_TOKENS", "tooshort:alice")
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "tooshort" not in capsys.readouterr().err


# ---- the token CLI -------------------------------------------------------------------------


def _cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point `cortex` at the database make_settings(tmp_path) uses; no .env, no stray settings."""
    monkeypatch.chdir(tmp_path)
    for name in ("CORTEX_AUTH", "CORTEX_AUTH_TOKENS", "CORTEX_HOST", "CORTEX_ALLOWED_ORIGINS"):
        monkeypatch.delenv(name, raising=False)
    url = f"sqlite+aiosqlite:///{tmp_path / 'cortex.db'}"
    monkeypatch.setenv("CORTEX_DATABASE_URL", url)
    return url


async def _cortex(*argv: str) -> int:
    # cli.main() runs its own event loop, so it gets a thread of its own.
    return await asyncio.to_thread(cli.main, list(argv))


async def test_token_cli_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli_env(tmp_path, monkeypatch)
    assert await _cortex("token", "create", "erin", "--name", "laptop") == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert re.fullmatch(r"ctx_[A-Za-z0-9_-]{43}", token)
    token_id = re.search(r"created token (\d+) for user erin", err)
    assert token_id is not None
    assert await _cortex("token", "create", "not a user") == 2
    capsys.readouterr()

    assert await _cortex("token", "list") == 0
    listing = capsys.readouterr().out
    assert "erin" in listing and "laptop" in listing
    assert token not in listing and hash_token(token) not in listing

    settings = make_settings(tmp_path, auth_recheck_s=0.05)  # loopback, auto: a token is stored
    async with running(settings) as app:
        assert (await refused(app.url)).response.status_code == 401
        async with connect(app.url, additional_headers=bearer(token)) as ws:
            client = Client(ws)
            conversation_id = await new_conversation(client, "from erin")
            await client.until_reply()
            rows, _ = await app.store.conversations(owner="erin")
            assert [r.id for r in rows] == [conversation_id]

            assert await _cortex("token", "revoke", token_id.group(1)) == 0
            await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
            assert ws.close_code == 1008
        refusal = await refused(app.url, additional_headers=bearer(token))
        assert refusal.response.status_code == 401

    assert await _cortex("token", "revoke", token_id.group(1)) == 0  # already revoked: no error
    assert await _cortex("token", "revoke", "999") == 1
    assert await _cortex("token", "list") == 0
    revoked_line = next(line for line in capsys.readouterr().out.splitlines() if "erin" in line)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s*$", revoked_line)  # REVOKED is set


@pytest.mark.slow
def test_token_cli_as_a_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cli_env(tmp_path, monkeypatch)

    def cortex(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cortex.cli", *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=60 * TIMEOUT)

    refused_start = cortex("serve", "--host", "0.0.0.0", "--port", "0")  # no token yet
    assert refused_start.returncode == 2 and "refusing to serve" in refused_start.stderr
    created = cortex("token", "create", "frank")
    assert created.returncode == 0 and created.stdout.startswith("ctx_")
    listed = cortex("token", "list")
    assert listed.returncode == 0 and "frank" in listed.stdout
    assert created.stdout.strip() not in listed.stdout + listed.stderr
