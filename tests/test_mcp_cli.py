"""`cortex mcp list|call` and `cortex doctor` on MCP servers: state, reasons, tools, left out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_settings

from cortex import cli
from cortex.doctor import run_checks

SERVERS = Path(__file__).parent / "mcp_servers"


def _write(tmp_path: Path, servers: dict[str, object]) -> Path:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return path


def _stdio(script: str) -> dict[str, object]:
    return {"command": sys.executable, "args": [str(SERVERS / script)]}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env from elsewhere
    monkeypatch.setenv("CORTEX_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setenv("CORTEX_MCP_CONNECT_TIMEOUT", "5")
    path = _write(tmp_path, {"demo": _stdio("demo.py"), "gone": _stdio("exits.py")})
    monkeypatch.setenv("CORTEX_MCP_CONFIG", str(path))
    return path


@pytest.mark.parametrize("command", [["mcp"], ["mcp", "list"], ["mcp", "call"]])
def test_mcp_commands_have_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: cortex {' '.join(command)}")


def test_mcp_list_shows_each_server(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mcp", "list"]) == 1  # one server is down
    out = capsys.readouterr().out
    assert "demo: connected (stdio)" in out and "demo__add" in out
    assert "gone: down (stdio): Connection closed" in out


def test_mcp_call(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mcp", "call", "demo", "add", '{"a": 20, "b": 22}']) == 0
    assert json.loads(capsys.readouterr().out) == {"result": 42}
    assert cli.main(["mcp", "call", "demo", "boom", '{"reason": "by hand"}']) == 1
    out = capsys.readouterr().out
    assert out.startswith("Error: ") and "boom: by hand" in out
    assert cli.main(["mcp", "call", "demo", "add", "[1]"]) == 1
    assert "must be a JSON object" in capsys.readouterr().out
    assert cli.main(["mcp", "call", "nope", "add"]) == 1
    assert "no server named 'nope'" in capsys.readouterr().out
    assert cli.main(["mcp", "call", "gone", "add"]) == 1
    assert "gone is down" in capsys.readouterr().out


def test_a_bad_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"files": {"command": "npx", "env": {"K": "${NOT_SET_HERE}"}}})
    monkeypatch.setenv("CORTEX_MCP_CONFIG", str(path))
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    assert cli.main(["mcp", "list"]) == 2
    assert "server 'files'.env.K: ${NOT_SET_HERE} is not set" in capsys.readouterr().out


async def test_doctor_lists_servers_and_left_out_tools(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {"demo": _stdio("demo.py"), "gone": _stdio("exits.py"), "many": _stdio("many.py"),
         "off": {**_stdio("demo.py"), "enabled": False}},
    )  # fmt: skip
    settings = make_settings(tmp_path, mcp_config=path, mcp_connect_timeout=5.0)
    checks = {c.name: c for c in await run_checks(settings, call_model=False, limit_s=20)}
    assert checks["mcp demo"].status == "ok" and "demo__echo" in checks["mcp demo"].detail
    assert checks["mcp gone"].status == "fail" and "Connection closed" in checks["mcp gone"].detail
    assert checks["mcp off"].status == "skip"
    assert checks["mcp tools"].status == "warn" and "many__t129" in checks["mcp tools"].detail
    bad = _write(tmp_path, {"x": {"url": "ftp://nowhere"}})
    checks = {
        c.name: c
        for c in await run_checks(settings.model_copy(update={"mcp_config": bad}), call_model=False)
    }
    assert checks["mcp"].status == "fail" and "server 'x'.url" in checks["mcp"].detail
