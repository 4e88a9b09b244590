"""The operator's `mcpServers` file (the format Claude Desktop, Cursor and others share).

Only this file can start a process or name a URL: no client frame reaches it. `${VAR}` in
`env` and `headers` is read from Cortex's environment so that secrets stay out of the file.
Every error names the server and the field, because the operator has to find it in the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["McpConfigError", "ServerConfig", "load_config", "parse_config"]

# Server names become the prefix of tool names (`server__tool`), so they obey the providers'
# name rule, stay short enough to leave room for the tool, and hold no `__` (the separator).
_SERVER_RE = re.compile(r"^[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*$")
_SERVER_MAX = 32
_VAR_RE = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELDS = frozenset(
    {"command", "args", "env", "cwd", "url", "headers", "enabled", "timeout", "tools", "users",
     "description", "type"}
)  # fmt: skip
# `type` is written by some clients ("stdio", "http", "streamable-http"); SSE is not supported.
_TYPES = frozenset({"stdio", "http", "streamable-http", "streamableHttp"})


class McpConfigError(ValueError):
    """The file is unusable; the message names the file, the server and the field."""


@dataclass(frozen=True)
class ServerConfig:
    """One server: either a `command` (stdio) or a `url` (streamable HTTP)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] | None = None
    enabled: bool = True
    timeout: float | None = None
    tools: tuple[str, ...] | None = None
    users: frozenset[str] | None = None
    description: str | None = None

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"


def _expand(value: str, where: str, environ: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        var = match.group(1)
        if not _VAR_NAME_RE.match(var):
            raise McpConfigError(f"{where}: ${{{var}}} is not a valid variable name")
        if var not in environ:
            raise McpConfigError(f"{where}: ${{{var}}} is not set in Cortex's environment")
        return environ[var]

    return _VAR_RE.sub(one, value)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise McpConfigError(f"{where} must be a list of strings")
    return list(value)


def _mapping(value: Any, where: str, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise McpConfigError(f"{where} must be an object of strings")
    return {k: _expand(v, f"{where}.{k}", environ) for k, v in value.items()}


def _server(name: str, raw: Any, environ: Mapping[str, str]) -> ServerConfig:
    at = f"server {name!r}"
    if not _SERVER_RE.match(name) or len(name) > _SERVER_MAX:
        raise McpConfigError(
            f"{at}: a server name is 1-{_SERVER_MAX} letters, digits, '-' or single '_'"
        )
    if not isinstance(raw, dict):
        raise McpConfigError(f"{at} must be an object")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise McpConfigError(f"{at}: unknown field(s) {', '.join(unknown)}")
    command, url = raw.get("command"), raw.get("url")
    if command is None and url is None:
        raise McpConfigError(f"{at}: needs either 'command' (stdio) or 'url' (streamable HTTP)")
    if command is not None and url is not None:
        raise McpConfigError(f"{at}: has both 'command' and 'url'; give one")
    if command is not None and (not isinstance(command, str) or not command):
        raise McpConfigError(f"{at}.command must be a non-empty string")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise McpConfigError(f"{at}.url must be an http:// or https:// URL")
    kind = raw.get("type")
    if kind is not None and kind not in _TYPES:
        raise McpConfigError(f"{at}.type {kind!r} is not supported (stdio or streamable HTTP)")
    if command is None:
        for field in ("args", "env", "cwd"):
            if field in raw:
                raise McpConfigError(f"{at}.{field} only applies to a 'command' server")
    elif "headers" in raw:
        raise McpConfigError(f"{at}.headers only applies to a 'url' server")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise McpConfigError(f"{at}.enabled must be true or false")
    timeout = raw.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise McpConfigError(f"{at}.timeout must be a number of seconds above 0")
    cwd = raw.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise McpConfigError(f"{at}.cwd must be a string")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise McpConfigError(f"{at}.description must be a string")
    tools = raw.get("tools")
    users = raw.get("users")
    return ServerConfig(
        name=name,
        command=command,
        args=tuple(_strings(raw["args"], f"{at}.args")) if "args" in raw else (),
        env=_mapping(raw["env"], f"{at}.env", environ) if "env" in raw else None,
        cwd=cwd,
        url=url,
        headers=_mapping(raw["headers"], f"{at}.headers", environ) if "headers" in raw else None,
        enabled=enabled,
        timeout=float(timeout) if timeout is not None else None,
        tools=tuple(_strings(tools, f"{at}.tools")) if tools is not None else None,
        users=frozenset(_strings(users, f"{at}.users")) if users is not None else None,
        description=description,
    )


def parse_config(text: str, environ: Mapping[str, str], *, source: str = "") -> list[ServerConfig]:
    """The servers in `text`; `McpConfigError` names what is wrong and where."""
    prefix = f"{source}: " if source else ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise McpConfigError(
            f"{prefix}not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise McpConfigError(f'{prefix}expected an object {{"mcpServers": {{...}}}}')
    try:
        return [_server(name, raw, environ) for name, raw in data["mcpServers"].items()]
    except McpConfigError as exc:
        raise McpConfigError(f"{prefix}{exc}") from None


def load_config(path: Path, environ: Mapping[str, str]) -> list[ServerConfig]:
    """Read the file `CORTEX_MCP_CONFIG` names."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise McpConfigError(f"CORTEX_MCP_CONFIG: cannot read {path}: {exc.strerror}") from None
    return parse_config(text, environ, source=str(path))
