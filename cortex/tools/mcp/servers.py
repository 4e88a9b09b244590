"""One supervised connection per MCP server; a server that fails hurts no other.

Each server has its own task: connect (bounded by `CORTEX_MCP_CONNECT_TIMEOUT`), list its tools
into the registry, then watch the connection (a `subscriptions/listen` stream on 2026-era
servers, list-changed notifications on older ones, and failed calls on both). When it breaks,
its tools leave the registry, and it is retried with exponential backoff, logged and counted.
The task owns its `Client` from enter to exit, as the SDK's task groups require, so cancelling
it at shutdown closes the session and stops the stdio child (the SDK kills its process tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import httpx2
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from ... import __version__
from ..registry import Tool, ToolRegistry, ToolResult
from .config import ServerConfig
from .naming import tool_name
from .results import to_result

if TYPE_CHECKING:
    from ...ops.metrics import Metrics

__all__ = ["McpServer", "McpServers"]

log = logging.getLogger("cortex.mcp")

State = Literal["connecting", "up", "down", "disabled"]
_BACKOFF_MAX_S = 60.0
_MAX_DESCRIPTION = 1024


def _reason(exc: BaseException) -> str:
    """The innermost cause, readable: the SDK wraps failures in task-group exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "no answer to initialize in time"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class McpServer:
    """One configured server: its connection, its tools while up, why it is down."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: ToolRegistry,
        metrics: Metrics | None,
        connect_timeout: float,
        backoff_s: float,
        result_max_chars: int,
    ) -> None:
        self.config = config
        self.name = config.name
        self.registry = registry
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.backoff_s = backoff_s
        self.result_max_chars = result_max_chars
        self.state: State = "connecting" if config.enabled else "disabled"
        self.reason: str | None = None if config.enabled else "disabled in the config file"
        self.tools: list[str] = []  # registry names, while up
        self.attempts = 0
        self.client: Client | None = None
        self.tried = asyncio.Event()  # the first attempt has ended, one way or the other
        self._broken = asyncio.Event()
        self._refreshing: set[asyncio.Task[None]] = set()

    # --- the connection ---------------------------------------------------------------------

    async def _client(self, stack: contextlib.AsyncExitStack) -> Client:
        """A connected `Client`, closed (with its process or HTTP client) by `stack`."""
        c = self.config
        target: StdioServerParameters | Any
        if c.command is not None:
            # The child gets the SDK's small allow-list (PATH, HOME, ...) plus the file's `env`:
            # never Cortex's own environment, which holds provider keys.
            target = StdioServerParameters(
                command=c.command, args=list(c.args), env=dict(c.env or {}), cwd=c.cwd
            )
        else:
            assert c.url is not None
            # No read limit on the HTTP client: the call's own timeout decides, whatever its
            # length (a fixed client limit is how calls end up cut at 60 s elsewhere). The SDK
            # leaves a client it was given open, so the stack closes it.
            http = await stack.enter_async_context(
                create_mcp_http_client(
                    headers=dict(c.headers or {}), timeout=httpx2.Timeout(30.0, read=None)
                )
            )
            target = streamable_http_client(c.url, http_client=http)
        client = Client(
            target,
            message_handler=self._on_message,
            client_info=types.Implementation(name="cortex", version=__version__),
            cache=None,  # a tool list must be fresh when the server says it changed
        )
        return await stack.enter_async_context(client)

    async def run(self) -> None:
        """Connect, serve, and on any failure retry with backoff, until cancelled."""
        delay = self.backoff_s
        while True:
            self.attempts += 1
            if self.attempts > 1:
                log.info("MCP server %s: reconnecting (attempt %d)", self.name, self.attempts)
                if self.metrics is not None:
                    self.metrics.mcp_reconnect(self.name)
            try:
                await self._connection()
                reason = "the connection was lost"
                delay = self.backoff_s  # it was up: start the backoff again
            except Exception as exc:
                reason = _reason(exc)
            self._set_down(reason)
            log.warning("MCP server %s is down (%s); retrying in %.1f s", self.name, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _connection(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(self.connect_timeout):
                client = await self._client(stack)
                await self._refresh(client)
            self._broken.clear()
            self.client = client
            self.state, self.reason = "up", None
            self.tried.set()
            if self.metrics is not None:
                self.metrics.mcp_state(self.name, up=True)
            log.info("MCP server %s connected: %d tools", self.name, len(self.tools))
            try:
                await self._watch(client)
            finally:
                self.client = None
                for task in self._refreshing:
                    task.cancel()

    async def _watch(self, client: Client) -> None:
        """Return when the connection breaks; refresh the tools when the server says so."""
        tasks: set[asyncio.Task[Any]] = {asyncio.create_task(self._broken.wait())}
        tools_caps = client.server_capabilities.tools
        if client.protocol_version in MODERN_PROTOCOL_VERSIONS and tools_caps is not None:
            tasks.add(asyncio.create_task(self._listen(client)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self, client: Client) -> None:
        """2026-era servers: a change stream; its abrupt end means the server is gone."""
        try:
            async with client.listen(tools_list_changed=True) as subscription:
                async for _event in subscription:
                    await self._refresh(client)
        except ListenNotSupportedError:
            await asyncio.Event().wait()  # nothing to listen to: failed calls tell instead
        except Exception as exc:
            log.debug("MCP server %s: listen stream ended: %s", self.name, exc)

    async def _on_message(self, message: Any) -> None:
        """Older servers send `notifications/tools/list_changed`; a transport error is fatal."""
        if isinstance(message, types.ToolListChangedNotification) and self.client is not None:
            task = asyncio.create_task(self._refresh(self.client))
            self._refreshing.add(task)
            task.add_done_callback(self._refreshing.discard)
        elif isinstance(message, Exception):
            log.info("MCP server %s: transport error: %s", self.name, message)
            self._broken.set()

    async def _refresh(self, client: Client) -> None:
        listed: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(100):  # a paginator that never ends cannot hang the connection
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            listed.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        allowed = self.config.tools
        tools = [self._tool(t) for t in listed if allowed is None or t.name in allowed]
        self.registry.set_server_tools(self.name, tools)
        self.tools = [t.name for t in tools]
        log.debug("MCP server %s: tools %s", self.name, ", ".join(self.tools))

    def _tool(self, listed: types.Tool) -> Tool:
        schema = dict(listed.input_schema or {})
        schema.setdefault("type", "object")
        text = listed.description or listed.title or f"{listed.name} (MCP server {self.name})"
        return Tool(
            name=tool_name(self.name, listed.name),
            description=text[:_MAX_DESCRIPTION],
            parameters=schema,
            fn=functools.partial(self._as_tool, listed.name),
            server=self.name,
            timeout=self.config.timeout,
            users=self.config.users,
        )

    def _set_down(self, reason: str) -> None:
        self.state, self.reason = "down", reason
        self.tools = []
        self.registry.set_server_tools(self.name, ())
        self.tried.set()
        if self.metrics is not None:
            self.metrics.mcp_state(self.name, up=False)

    # --- calls ------------------------------------------------------------------------------

    async def _as_tool(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109 - the call's budget, applied inside
    ) -> ToolResult:
        return await self.call(tool, arguments, timeout=timeout)

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109 - the call's budget, applied inside
    ) -> ToolResult:
        """Call `tool`; every failure is a result the model reads. A cancelled caller (a user's
        `cancel`) or an expired timeout cancels the request at the server: the SDK sends
        `notifications/cancelled` when the awaiting task is cancelled."""
        client = self.client
        if client is None:
            return ToolResult(
                ok=False, error=f"MCP server {self.name} is down ({self.reason})", server=self.name
            )
        started = time.monotonic()
        outcome = "error"
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                result = await client.call_tool(tool, arguments)
            converted = to_result(result, server=self.name, limit=self.result_max_chars)
            outcome = "ok" if converted.ok else "error"
            return converted
        except TimeoutError:
            if not scope.expired():
                raise
            outcome = "timeout"
            return ToolResult(
                ok=False,
                error=f"{tool}: timed out after {timeout:g} s (cancelled at the server)",
                server=self.name,
            )
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                self._broken.set()  # the watcher marks it down and reconnects
            return ToolResult(ok=False, error=f"{tool}: {exc.message}", server=self.name)
        except Exception as exc:  # e.g. a result that is not valid MCP: garbage, not a crash
            log.info("MCP server %s: call %s failed: %r", self.name, tool, exc)
            return ToolResult(
                ok=False, error=f"{tool}: {type(exc).__name__}: {_reason(exc)}", server=self.name
            )
        finally:
            if self.metrics is not None:
                self.metrics.mcp_call(self.name, outcome, time.monotonic() - started)


class McpServers:
    """Every configured server, connected in parallel without holding up the start."""

    def __init__(
        self,
        configs: Sequence[ServerConfig],
        *,
        registry: ToolRegistry,
        metrics: Metrics | None = None,
        connect_timeout: float = 10.0,
        backoff_s: float = 1.0,
        result_max_chars: int = 20_000,
    ) -> None:
        self.registry = registry
        self.servers = {
            c.name: McpServer(
                c,
                registry=registry,
                metrics=metrics,
                connect_timeout=connect_timeout,
                backoff_s=backoff_s,
                result_max_chars=result_max_chars,
            )
            for c in configs
        }
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """One task per enabled server; none waits for another, nor the server for them."""
        for server in self.servers.values():
            if server.config.enabled:
                self._tasks.append(asyncio.create_task(server.run(), name=f"mcp-{server.name}"))

    async def wait_tried(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until every enabled server has connected or failed once (the CLI and doctor)."""
        waits = [s.tried.wait() for s in self.servers.values() if s.config.enabled]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waits)

    async def stop(self) -> None:
        """Close every session and stop every stdio child (cancelling a task does both)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> list[dict[str, Any]]:
        """What `cortex doctor` and `cortex mcp list` print."""
        return [
            {
                "server": s.name,
                "transport": s.config.transport,
                "state": s.state,
                "reason": s.reason,
                "tools": list(s.tools),
                "attempts": s.attempts,
            }
            for s in self.servers.values()
        ]

    def names(self) -> Iterable[str]:
        return self.servers.keys()
