"""The command line: --help on every command, and `cortex doctor`'s report and exit status."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cortex import cli
from cortex.store.engine import MIGRATIONS_DIR
from cortex.testing.fake_openai import FakeOpenAI, Reply
from cortex.testing.services import RedisServer

COMMANDS = [
    [],
    ["serve"],
    ["migrate"],
    ["doctor"],
    ["chat"],
    ["token"],
    ["token", "create"],
    ["token", "list"],
    ["token", "revoke"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cortex")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cortex {' '.join(command)}".rstrip())
    assert len(out.splitlines()) > 3


@pytest.fixture
def doctor_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: no .env, no provider keys, a database in tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in (
        "OPENAI_API_KEY",
        "CORTEX_LLM_API_KEY",
        "CORTEX_LLM_API_BASE",
        "CORTEX_DEFAULT_MODEL",
        "CORTEX_USE_MOCK",
        "CORTEX_AUTH",
        "CORTEX_AUTH_TOKENS",
        "CORTEX_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORTEX_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cortex.db'}")
    return tmp_path


async def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    # cli.main() runs its own event loop: a thread of its own, beside the fake provider's loop.
    status = await asyncio.to_thread(cli.main, ["doctor", *args])
    return status, capsys.readouterr().out


async def test_doctor_passes_with_a_working_setup(
    doctor_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    provider: FakeOpenAI,
) -> None:
    monkeypatch.setenv("CORTEX_DEFAULT_MODEL", "openai/fake-model")
    monkeypatch.setenv("CORTEX_LLM_API_BASE", provider.base_url)
    monkeypatch.setenv("CORTEX_LLM_API_KEY", "sk-fake")
    provider.enqueue(Reply(text="OK"))
    status, out = await doctor(capsys)
    assert "WARN  database" in out and "does not exist yet" in out  # serve would create it
    assert status == 0
    assert await asyncio.to_thread(cli.main, ["migrate"]) == 0
    provider.enqueue(Reply(text="OK"))
    status, out = await doctor(capsys)
    assert status == 0, out
    newest = sorted(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("[0-9]*.py"))[-1]
    assert "ok    database" in out and f"ok    migrations    at {newest}, the newest" in out
    assert "ok    provider key  openai/fake-model: present (CORTEX_LLM_API_KEY)" in out
    assert "ok    stream path   openai/fake-model: direct (Cortex reads" in out
    assert "ok    model         openai/fake-model answered" in out
    assert out.rstrip().endswith("Everything looks right.")
    assert provider.requests[-1]["max_tokens"] == 1 and not provider.requests[-1].get("stream")


async def test_doctor_reports_a_missing_key(
    doctor_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORTEX_DEFAULT_MODEL", "gpt-4o-mini")
    status, out = await doctor(capsys)
    assert status == 1
    assert "FAIL  provider key  gpt-4o-mini needs OPENAI_API_KEY, which is not set" in out
    assert "skip  model         not called: a provider key is missing" in out
    assert "1 check failed." in out
    monkeypatch.setenv("CORTEX_LLM_FAST_PATH", "0")
    status, out = await doctor(capsys, "--no-model")
    assert "stream path   gpt-4o-mini: LiteLLM (CORTEX_LLM_FAST_PATH is off)" in out
    monkeypatch.setenv("CORTEX_DEFAULT_MODEL", "anthropic/claude-3-5-sonnet-20240620")
    monkeypatch.delenv("CORTEX_LLM_FAST_PATH")
    status, out = await doctor(capsys, "--no-model")
    assert "stream path   anthropic/claude-3-5-sonnet-20240620: LiteLLM (not OpenAI-format" in out


async def test_doctor_reports_an_unreachable_database(
    doctor_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORTEX_DATABASE_URL", "sqlite+aiosqlite:////no/such/directory/cortex.db")
    status, out = await doctor(capsys, "--no-model")
    assert status == 1
    assert "FAIL  database      directory /no/such/directory does not exist" in out

    broken = doctor_env / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("CORTEX_DATABASE_URL", f"sqlite+aiosqlite:///{broken}")
    status, out = await doctor(capsys, "--no-model")
    assert status == 1
    assert "FAIL  database      cannot reach sqlite+aiosqlite:///" in out
    assert "not a database" in out and "skip  migrations" in out

    monkeypatch.setenv("CORTEX_DATABASE_URL", "postgresql+asyncpg://cortex:s3cret@127.0.0.1:1/x")
    status, out = await doctor(capsys, "--no-model")
    assert status == 1 and "FAIL  database" in out and "s3cret" not in out


async def test_doctor_checks_redis_when_processes_share_it(
    doctor_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_server: RedisServer,
) -> None:
    monkeypatch.setenv("CORTEX_REDIS_URL", redis_server.url)
    status, out = await doctor(capsys, "--no-model")
    assert status == 0, out
    assert f"ok    redis         {redis_server.url} reachable" in out

    monkeypatch.setenv("CORTEX_REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")
    status, out = await doctor(capsys, "--no-model")
    assert status == 1 and "FAIL  redis" in out and "unreachable" in out
    assert "s3cret" not in out
