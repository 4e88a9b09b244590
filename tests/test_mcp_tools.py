"""MCP tools through the real pipeline: SDK-written servers over stdio and streamable HTTP, the
model's tool calls scripted by the fake provider, every isolation rule of docs/tools.md."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, Client, eventually, final_message

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec
from cortex.testing.services import free_port

SERVERS = Path(__file__).parent / "mcp_servers"


def _stdio(script: str, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(SERVERS / script)], **extra}


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    return tmp_path / "marks.txt"


@pytest.fixture
def mcp_app(tmp_path: Path, start_server: Any, marks: Path) -> Callable[..., Any]:
    """Start Cortex with an `mcpServers` file; waits until the named servers are up."""

    async def _start(servers: dict[str, Any], up: tuple[str, ...] = (), **overrides: Any) -> Any:
        path = tmp_path / "mcp.json"
        path.write_text(json.dumps({"mcpServers": servers}))
        overrides.setdefault("mcp_connect_timeout", 5.0)
        app: Cortex = await start_server(mcp_config=path, **overrides)
        await eventually(lambda: all(app.mcp.servers[n].state == "up" for n in up))
        return app

    return _start


def demo(marks: Path, **extra: Any) -> dict[str, Any]:
    return _stdio("demo.py", env={"MCP_MARKS": str(marks), "GIVEN": "yes"}, **extra)


def _events(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def _ask(
    app: Cortex, connect_to: Any, provider: FakeOpenAI, *calls: ToolCallSpec
) -> tuple[list[dict[str, Any]], Client]:
    provider.enqueue(Reply(text="", tool_calls=list(calls)), Reply(text="Done."))
    client: Client = await connect_to(app)
    await client.send(type="send", content="use the tools")
    return await client.until_reply(), client


async def test_stdio_tools_run_through_the_whole_loop(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORTEX_TEST_SECRET", "do-not-leak")
    app = await mcp_app({"demo": demo(Path("/dev/null"))}, up=("demo",))
    events, _ = await _ask(
        app,
        connect_to,
        provider,
        ToolCallSpec(name="demo__add", arguments='{"a": 2, "b": 40}', id="c1"),
        ToolCallSpec(name="demo__picture", arguments="{}", id="c2"),
        ToolCallSpec(name="demo__boom", arguments='{"reason": "testing"}', id="c3"),
        ToolCallSpec(name="demo__env", arguments='{"name": "CORTEX_TEST_SECRET"}', id="c4"),
        ToolCallSpec(name="demo__env", arguments='{"name": "GIVEN"}', id="c5"),
        ToolCallSpec(name="calculator", arguments='{"expression": "1+1"}', id="c6"),
    )
    offered = {t["function"]["name"]: t["function"] for t in provider.requests[0]["tools"]}
    assert offered["demo__add"]["description"] == "Add two integers."
    assert offered["demo__add"]["parameters"]["required"] == ["a", "b"]
    calls = {c["call_id"]: c for c in _events(events, "tool_call")}
    assert calls["c1"]["server"] == "demo" and calls["c6"]["server"] is None
    results = {r["call_id"]: r for r in _events(events, "tool_result")}
    assert results["c1"] == results["c1"] | {"ok": True, "server": "demo"}
    assert json.loads(results["c1"]["result"]) == {"result": 42}  # structured content, as JSON
    assert results["c2"]["ok"] and "[image: image/png, 2.0 kB" in results["c2"]["result"]
    assert results["c3"]["ok"] is False and "boom: testing" in results["c3"]["error"]
    assert json.loads(results["c4"]["result"]) == {"result": "<unset>"}  # not Cortex's env
    assert json.loads(results["c5"]["result"]) == {"result": "yes"}  # the file's env
    assert results["c6"]["server"] is None and results["c6"]["result"] == 2
    tool_messages = {m["tool_call_id"]: m for m in provider.requests[1]["messages"][3:]}
    assert tool_messages["c3"]["content"].startswith("Error: ")  # is_error reaches the model
    assert final_message(events)["content"] == "Done."


async def test_streamable_http_server(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, tmp_path: Path
) -> None:
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVERS / "demo.py"),
        "http",
        str(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        async with asyncio.timeout(TIMEOUT), aiohttp.ClientSession() as session:
            while True:  # until uvicorn listens
                try:
                    async with session.get(url):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        app = await mcp_app({"web": {"url": url, "headers": {"X-Test": "${HOME}"}}}, up=("web",))
        events, _ = await _ask(
            app, connect_to, provider, ToolCallSpec("web__echo", '{"text": "over http"}', "h1")
        )
        (result,) = _events(events, "tool_result")
        assert result["ok"] and result["server"] == "web"
        assert json.loads(result["result"]) == {"result": "over http"}
    finally:
        child.kill()  # uvicorn would wait for Cortex's open session to end
        await child.wait()


async def test_a_long_result_is_cut_and_the_cut_marked(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await mcp_app({"demo": demo(Path("/dev/null"))}, up=("demo",), tool_result_max_chars=1000)
    events, _ = await _ask(app, connect_to, provider, ToolCallSpec("demo__big", "{}", "b1"))
    (result,) = _events(events, "tool_result")
    assert result["ok"] and len(result["result"]) < 1100
    assert result["result"].endswith("more characters not shown]")
    sent = provider.requests[1]["messages"][-1]["content"]
    assert sent == result["result"]


async def test_broken_servers_are_left_out_and_the_others_work(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.mcp")
    app = await mcp_app(
        {
            "gone": _stdio("exits.py"),
            "mute": _stdio("silent.py"),
            "junk": _stdio("garbage.py"),
            "demo": demo(Path("/dev/null")),
            "off": _stdio("demo.py", enabled=False),
        },
        up=("demo",),
        mcp_connect_timeout=4.0,
        mcp_backoff_s=0.2,
    )
    servers = app.mcp.servers
    await eventually(
        lambda: all(servers[n].attempts >= 2 for n in ("gone", "mute", "junk")), timeout=30
    )
    status = {s["server"]: s for s in app.mcp.status()}
    assert status["demo"]["state"] == "up" and "demo__add" in status["demo"]["tools"]
    assert status["gone"]["state"] in ("down", "connecting") and status["gone"]["tools"] == []
    assert status["off"] == status["off"] | {"state": "disabled", "attempts": 0}
    assert "initialize" in (servers["mute"].reason or "")
    assert status["junk"]["tools"] == [] and servers["junk"].reason
    events, _ = await _ask(
        app, connect_to, provider, ToolCallSpec("demo__add", '{"a": 1, "b": 1}', "ok1")
    )
    assert _events(events, "tool_result")[0]["ok"] is True
    offered = [t["function"]["name"] for t in provider.requests[0]["tools"]]
    assert "demo__add" in offered
    assert not [n for n in offered if n.startswith(("gone", "mute", "junk"))]
    # The retries are logged and counted.
    assert any("MCP server gone is down" in r.getMessage() for r in caplog.records)
    assert any("gone: reconnecting" in r.getMessage() for r in caplog.records)
    body, _ = app.metrics.render()
    assert 'cortex_mcp_reconnects_total{server="gone"}' in body.decode()
    assert 'cortex_mcp_up{server="demo"} 1.0' in body.decode()


async def test_a_server_that_crashes_mid_call_is_reconnected(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await mcp_app({"demo": demo(Path("/dev/null"))}, up=("demo",), mcp_backoff_s=0.1)
    events, _ = await _ask(app, connect_to, provider, ToolCallSpec("demo__crash", "{}", "x1"))
    (result,) = _events(events, "tool_result")
    assert result["ok"] is False and result["server"] == "demo"
    server = app.mcp.servers["demo"]
    await eventually(lambda: server.attempts >= 2 and server.state == "up")
    events, _ = await _ask(
        app, connect_to, provider, ToolCallSpec("demo__add", '{"a": 1, "b": 2}', "x2")
    )
    assert _events(events, "tool_result")[0]["ok"] is True


async def test_the_server_timeout_wins_and_cancels_at_the_server(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, marks: Path
) -> None:
    # The global timeout is short and the server's long: the server's is honoured (a 1.5 s
    # call succeeds past CORTEX_TOOL_TIMEOUT). A call past the server's own is cancelled there.
    app = await mcp_app({"demo": demo(marks, timeout=3.0)}, up=("demo",), tool_timeout=0.5)
    events, _ = await _ask(
        app, connect_to, provider, ToolCallSpec("demo__slow", '{"seconds": 1.5}', "s1")
    )
    assert _events(events, "tool_result")[0]["ok"] is True
    events, _ = await _ask(
        app, connect_to, provider, ToolCallSpec("demo__slow", '{"seconds": 60}', "s2")
    )
    (result,) = _events(events, "tool_result")
    assert result["ok"] is False and "timed out after 3 s" in result["error"]
    await eventually(lambda: marks.exists() and "slow cancelled" in marks.read_text())
    body = app.metrics.render()[0].decode()
    assert 'cortex_mcp_calls_total{outcome="timeout",server="demo"} 1.0' in body
    assert 'cortex_mcp_calls_total{outcome="ok",server="demo"} 1.0' in body
    assert 'cortex_tool_calls_total{outcome="ok",tool="demo__slow"} 1.0' in body  # its own label


async def test_a_user_cancel_cancels_the_call_at_the_server(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, marks: Path
) -> None:
    app = await mcp_app({"demo": demo(marks)}, up=("demo",), tool_timeout=120)
    provider.enqueue(
        Reply(text="", tool_calls=[ToolCallSpec("demo__slow", '{"seconds": 60}', "u1")]),
        Reply(text="never"),
    )
    client: Client = await connect_to(app)
    await client.send(type="send", content="wait")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_type("tool_call")
    await eventually(lambda: marks.exists() and "slow started" in marks.read_text())
    await client.send(type="cancel", conversation_id=conversation_id)
    await client.until_reply()
    await eventually(lambda: "slow cancelled" in marks.read_text())


async def test_users_list_keeps_a_server_to_its_users(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await mcp_app({"demo": demo(Path("/dev/null"), users=["someone-else"])}, up=("demo",))
    events, _ = await _ask(
        app, connect_to, provider, ToolCallSpec("demo__add", '{"a": 1, "b": 1}', "p1")
    )
    offered = [t["function"]["name"] for t in provider.requests[0]["tools"]]
    assert offered and not any(n.startswith("demo__") for n in offered)
    (result,) = _events(events, "tool_result")
    assert result["ok"] is False and "unknown tool" in result["error"]


async def test_at_most_128_tools_are_offered(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    app = await mcp_app({"many": _stdio("many.py")}, up=("many",))
    await _ask(app, connect_to, provider)
    offered = [t["function"]["name"] for t in provider.requests[0]["tools"]]
    assert len(offered) == 128 and "many__t129" not in offered
    assert "many__t129" in app.tools.left_out
    assert any(
        "left out" in r.getMessage() and "many__t129" in r.getMessage() for r in caplog.records
    )


def _children_running(tag: str) -> list[int]:
    """Processes whose command line mentions `tag` (the process table, as `ps` reads it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if tag in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


async def test_shutdown_leaves_no_orphans(
    tmp_path: Path, provider: FakeOpenAI, marks: Path
) -> None:
    from conftest import make_settings

    from cortex.app import running

    script = tmp_path / "own_demo.py"  # a path of this test's own, to find its processes
    script.write_text((SERVERS / "demo.py").read_text())
    path = tmp_path / "mcp.json"
    servers = {f"s{i}": {"command": sys.executable, "args": [str(script)]} for i in range(3)}
    path.write_text(json.dumps({"mcpServers": servers}))
    settings = make_settings(tmp_path, provider, mcp_config=path)
    async with running(settings) as app:
        await eventually(lambda: all(s.state == "up" for s in app.mcp.servers.values()))
        assert len(_children_running(str(script))) == 3
    assert _children_running(str(script)) == []


async def test_a_list_change_refreshes_the_tools(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await mcp_app({"demo": demo(Path("/dev/null"))}, up=("demo",))
    assert "demo__extra" not in app.tools.names
    events, _ = await _ask(app, connect_to, provider, ToolCallSpec("demo__grow", "{}", "g1"))
    assert _events(events, "tool_result")[0]["ok"] is True
    await eventually(lambda: "demo__extra" in app.tools.names)


async def test_cortex_tools_the_servers_tools_list_and_send_select_among_all(
    mcp_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await mcp_app(
        {
            "demo": demo(Path("/dev/null"), tools=["add", "echo", "slow"]),
            "other": _stdio("demo.py"),
        },
        up=("demo", "other"),
        tools=["calculator", "demo__add", "demo__echo", "other__echo"],
    )
    # `slow` is listed by the server's `tools` but not by CORTEX_TOOLS; `other__add` the reverse.
    assert app.tools.names == ["calculator", "demo__add", "demo__echo", "other__echo"]
    provider.enqueue(Reply(text="all"), Reply(text="some"))
    client: Client = await connect_to(app)
    await client.send(type="send", content="everything")
    await client.until_reply()
    await client.send(type="send", content="some", tools=["demo__echo", "calculator"])
    await client.until_reply()
    offered = [[t["function"]["name"] for t in r["tools"]] for r in provider.requests]
    assert offered == [app.tools.names, ["demo__echo", "calculator"]]
    error = await client.request(type="send", content="x", tools=["other__add"])
    assert error["type"] == "error" and error["code"] == "bad_frame"
