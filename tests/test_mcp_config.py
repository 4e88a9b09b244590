"""The `mcpServers` file and tool names: every bad file is an error naming server and field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cortex.app import Cortex
from cortex.errors import StartupError
from cortex.tools.mcp import McpConfigError, load_config, tool_name
from cortex.tools.mcp.config import parse_config
from cortex.tools.registry import UnknownTool, build_registry

ENV = {"TOKEN": "s3cret", "ROOT": "/srv"}


def _parse(servers: Any) -> Any:
    return parse_config(json.dumps({"mcpServers": servers}), ENV)


def test_a_good_file_with_both_transports_and_variables() -> None:
    files, search = _parse(
        {
            "files": {
                "command": "npx",
                "args": ["-y", "pkg", "${ROOT}"],
                "env": {"ROOT_DIR": "${ROOT}/data"},
                "timeout": 120,
                "tools": ["read_file"],
                "users": ["alice"],
                "description": "Files",
            },
            "search": {
                "url": "https://example.com/mcp",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "enabled": False,
                "type": "http",
            },
        }
    )
    assert files.transport == "stdio" and files.command == "npx"
    assert files.env == {"ROOT_DIR": "/srv/data"}
    assert files.args == ("-y", "pkg", "${ROOT}")  # only env and headers are expanded
    assert files.timeout == 120.0 and files.tools == ("read_file",)
    assert files.users == frozenset({"alice"})
    assert search.transport == "http" and search.enabled is False
    assert search.headers == {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "mcpServers"),
        ('{"servers": {}}', "mcpServers"),
        ('{"mcpServers": []}', "mcpServers"),
    ],
)
def test_bad_files(text: str, part: str) -> None:
    with pytest.raises(McpConfigError, match=part):
        parse_config(text, ENV)


@pytest.mark.parametrize(
    ("servers", "part"),
    [
        ({"a": "npx"}, "server 'a' must be an object"),
        ({"a": {}}, "server 'a': needs either 'command'"),
        ({"a": {"command": "x", "url": "http://h/mcp"}}, "server 'a': has both"),
        ({"a": {"command": 3}}, "server 'a'.command must be"),
        ({"a": {"url": "ftp://h"}}, "server 'a'.url must be"),
        ({"a": {"command": "x", "args": "-y"}}, "server 'a'.args must be a list"),
        ({"a": {"command": "x", "env": {"K": 1}}}, "server 'a'.env must be an object"),
        ({"a": {"command": "x", "colour": "red"}}, "unknown field(s) colour"),
        ({"a": {"command": "x", "timeout": -1}}, "server 'a'.timeout"),
        ({"a": {"command": "x", "timeout": True}}, "server 'a'.timeout"),
        ({"a": {"command": "x", "enabled": "yes"}}, "server 'a'.enabled"),
        ({"a": {"command": "x", "tools": "all"}}, "server 'a'.tools must be a list"),
        ({"a": {"command": "x", "users": [1]}}, "server 'a'.users must be a list"),
        ({"a": {"command": "x", "headers": {}}}, "server 'a'.headers only applies"),
        ({"a": {"url": "http://h/mcp", "args": []}}, "server 'a'.args only applies"),
        ({"a": {"url": "http://h/mcp", "type": "sse"}}, "'sse' is not supported"),
        (
            {"a": {"command": "x", "env": {"K": "${NOPE}"}}},
            r"server 'a'.env.K: \$\{NOPE\} is not set",
        ),
        ({"a": {"url": "http://h", "headers": {"H": "${1BAD}"}}}, "not a valid variable name"),
        ({"a__b": {"command": "x"}}, "server 'a__b'"),
        ({"bad name": {"command": "x"}}, "server 'bad name'"),
        ({"x" * 33: {"command": "x"}}, "1-32 letters"),
    ],
)
def test_bad_servers_name_server_and_field(servers: Any, part: str) -> None:
    with pytest.raises(McpConfigError, match=part if "\\" in part else re.escape(part)):
        _parse(servers)


def test_a_missing_file_and_the_start_refusal(tmp_path: Path) -> None:
    with pytest.raises(McpConfigError, match="cannot read"):
        load_config(tmp_path / "nope.json", ENV)
    bad = tmp_path / "mcp.json"
    bad.write_text(json.dumps({"mcpServers": {"files": {"command": "x", "bogus": 1}}}))
    from conftest import make_settings

    with pytest.raises(StartupError, match=r"mcp.json: server 'files': unknown field\(s\) bogus"):
        Cortex(make_settings(tmp_path, mcp_config=bad))


def test_names_are_valid_stable_and_unique() -> None:
    assert tool_name("files", "read_file") == "files__read_file"
    long = tool_name("files", "a" * 80)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", long) and len(long) == 64
    assert long == tool_name("files", "a" * 80)  # stable across runs
    assert long != tool_name("files", "a" * 81)  # the hash tells long names apart
    odd = tool_name("web", "search.v2/query")
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", odd) and odd.startswith("web__search_v2_query_")
    assert odd != tool_name("web", "search_v2_query")
    assert tool_name("x" * 32, "t" * 29).startswith("x" * 32 + "__")  # the prefix survives


def test_cortex_tools_may_name_tools_of_configured_servers() -> None:
    registry = build_registry(
        modules=[], enabled=["calculator", "files__read"], mcp_servers=["files"]
    )
    assert registry.names == ["calculator"]
    with pytest.raises(UnknownTool, match="web__search"):
        build_registry(modules=[], enabled=["web__search"], mcp_servers=["files"])
