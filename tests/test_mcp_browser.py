"""The page's tool-call view in Chromium: the MCP server's name, and an `is_error` result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import eventually, make_settings
from playwright.async_api import expect
from test_browser import (  # noqa: F401 - fixtures used by name
    OpenTab,
    browser,
    chromium,
    open_tab,
    open_url,
    send,
)

from cortex.app import Cortex
from cortex.config import Settings
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

DEMO = Path(__file__).parent / "mcp_servers" / "demo.py"


@pytest.fixture
def settings(tmp_path: Path, provider: FakeOpenAI, database_url: str) -> Settings:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps({"mcpServers": {"demo": {"command": sys.executable, "args": [str(DEMO)]}}})
    )
    return make_settings(tmp_path, provider, database_url=database_url, mcp_config=path)


async def test_tool_view_names_the_server_and_shows_errors(
    server: Cortex,
    open_tab: OpenTab,  # noqa: F811 - the fixture imported above
    provider: FakeOpenAI,
) -> None:
    await eventually(lambda: server.mcp.servers["demo"].state == "up")
    provider.enqueue(
        Reply(
            text="",
            tool_calls=[
                ToolCallSpec(name="demo__add", arguments='{"a": 2, "b": 3}', id="ok"),
                ToolCallSpec(name="demo__boom", arguments='{"reason": "shown"}', id="bad"),
                ToolCallSpec(name="calculator", arguments='{"expression": "1+1"}', id="py"),
            ],
        ),
        Reply(text="One worked, one failed."),
    )
    page = (await open_tab()).page
    await send(page, "try the tools")
    await expect(page.locator("#messages li[data-status='complete']").last).to_contain_text(
        "One worked, one failed."
    )
    tools = page.locator("#messages details.tool")
    await expect(tools).to_have_count(3)
    ok, bad, py = tools.nth(0), tools.nth(1), tools.nth(2)
    await expect(ok.locator(".tool-server")).to_have_text("demo")
    await expect(ok.locator(".tool-state")).to_have_text("Done")
    await expect(bad.locator(".tool-server")).to_have_text("demo")
    await expect(bad.locator(".tool-state")).to_have_text("Failed")
    await bad.locator("summary").click()
    await expect(bad.locator(".tool-body")).to_contain_text("boom: shown")
    await expect(py.locator(".tool-server")).to_have_count(0)  # a Python tool has no server
