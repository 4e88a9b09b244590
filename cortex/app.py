"""Cortex assembled: settings in, a running server out. Wiring and lifecycle only.

Each part gets what it uses and nothing more; no part holds the app (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.server import Server, serve

from .auth.gate import Gate, OriginPolicy
from .auth.tokens import LOCAL_USER, Authenticator, auth_required, parse_env_tokens
from .config import Settings
from .errors import CortexError, StartupError
from .fanout.hub import Hub
from .fanout.leases import RedisLeases
from .fanout.redis_hub import RedisHub
from .llm import LlmService
from .ops.metrics import Metrics
from .ops.telemetry import Telemetry
from .pipeline.manage import ConversationManager
from .pipeline.router import Router
from .server.connection import Connection
from .server.dispatch import frame_handlers
from .server.endpoint import Endpoint
from .server.handshakes import ReportingConnection, websockets_logger
from .server.routes import HttpRoutes
from .store import Store, TokenStore, make_engine, migrate
from .tools.mcp import McpConfigError, McpServers, ServerConfig, load_config
from .tools.registry import ToolRegistry, build_registry

log = logging.getLogger("cortex")

__all__ = ["LOCAL_USER", "Cortex", "running"]


class Cortex:
    """The parts of one server process, wired together from one `Settings`."""

    def __init__(
        self, settings: Settings, *, llm: LlmService | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        # Each app has its own registry, so several apps (tests) never share counters.
        self.metrics = metrics if metrics is not None else Metrics()
        self.telemetry = Telemetry(settings, self.metrics)
        self.engine = make_engine(settings)
        self.store = Store(self.engine, observe=self.metrics.observe_db)
        self.tokens = TokenStore(self.engine, observe=self.metrics.observe_db)
        self.hub: Hub
        leases: RedisLeases | None = None
        if settings.redis_url is not None:
            redis_hub = RedisHub(
                settings.redis_url.get_secret_value(),
                delta_interval_s=settings.delta_interval_ms / 1000,
            )
            leases = RedisLeases(redis_hub.redis, ttl=settings.reply_lease_s)
            self.hub = redis_hub
        else:
            self.hub = Hub(delta_interval_s=settings.delta_interval_ms / 1000)
        self.llm = llm or LlmService(settings)
        mcp_configs = load_mcp_configs(settings)
        self.tools: ToolRegistry = build_registry(
            modules=settings.tool_modules,
            enabled=settings.tools,
            mcp_servers=[c.name for c in mcp_configs],
        )
        self.metrics.known_tools(self.tools.known)
        self.mcp = McpServers(
            mcp_configs,
            registry=self.tools,
            metrics=self.metrics,
            connect_timeout=settings.mcp_connect_timeout,
            backoff_s=settings.mcp_backoff_s,
            result_max_chars=settings.tool_result_max_chars,
        )
        self.router = Router(
            settings=settings,
            store=self.store,
            llm=self.llm,
            hub=self.hub,
            tools=self.tools,
            telemetry=self.telemetry,
            leases=leases,
        )
        if isinstance(self.hub, RedisHub):
            self.hub.on_resync = self.router.resync
        self.manager = ConversationManager(
            settings=settings,
            store=self.store,
            abandon=self.router.abandon,
            hub=self.hub,
            llm=self.llm,
            telemetry=self.telemetry,
        )
        self.metrics.watch(subscriptions=self.hub.subscriber_count, replies=self.router.in_progress)
        self.endpoint = Endpoint(
            settings=settings,
            routes=HttpRoutes(settings=settings, reads=self.router.reads, ready=self.ready),
            dispatch=frame_handlers(self.router, self.manager, self.hub),
            hub=self.hub,
            metrics=self.metrics,
            telemetry=self.telemetry,
            tokens=self.tokens,
            files=self.router.files,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.server: Server | None = None
        self._port: int | None = None

    @property
    def gate(self) -> Gate | None:
        return self.endpoint.gate

    @property
    def connections(self) -> dict[Connection, Any]:
        return self.endpoint.connections

    @property
    def port(self) -> int:
        if self._port is None and self.server is not None:
            sockname: Any = next(iter(self.server.sockets)).getsockname()
            self._port = int(sockname[1])
        assert self._port is not None, "the server is not started"
        return self._port

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.port}/ws"

    async def ready(self) -> bool:
        """Database reachable, and Redis too when processes share work through it."""
        return self.hub.healthy() and await self.store.ping()

    async def build_gate(self) -> Gate:
        """Read the access settings and the tokens table; refuse (AuthConfigError) if unsafe."""
        s = self.settings
        env = parse_env_tokens(s.auth_tokens.get_secret_value()) if s.auth_tokens else {}
        origins = OriginPolicy(s.allowed_origins)
        stored = await self.tokens.count_active()
        required = auth_required(s, env_tokens=len(env), stored_tokens=stored)
        authenticator = Authenticator(required=required, env_tokens=env, store=self.tokens)
        return Gate(authenticator, origins, loopback_hosts_only=not required and s.auth == "auto")

    async def _sweep(self) -> None:
        """Every `sweep_interval_s`: answer what nobody answers, leave idle Redis channels."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.router.sweep()
                await self.hub.housekeeping()
            except CortexError:
                log.warning("could not look for unanswered messages", exc_info=True)

    async def start(self) -> None:
        # MCP servers connect in the background, each on its own: a slow or broken one holds up
        # neither the start nor the others (its tools join the registry when it is up).
        self.mcp.start()
        await asyncio.to_thread(migrate, self.settings.database_url)
        self.endpoint.gate = gate = await self.build_gate()
        await self.hub.start()
        if self.router.leases is None:
            # Alone on its database, whatever is left streaming was a previous run's. With
            # peers, a row streaming may be theirs: it is settled under its lease instead.
            recovered = await self.store.recover_interrupted()
            if recovered:
                log.warning(
                    "marked %d replies left streaming by a previous process as interrupted",
                    recovered,
                )
        await self.router.sweep()  # messages acknowledged but never answered (a crash)
        s = self.settings
        try:
            self.server = await self._listen()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise StartupError(
                f"cannot listen on {s.host}:{s.port}: {reason} "
                "(CORTEX_HOST and CORTEX_PORT, or --host and --port)"
            ) from exc
        self._tasks.append(asyncio.create_task(self._sweep(), name="sweeper"))
        if gate.authenticator.required:
            recheck = self.endpoint.recheck_tokens()
            self._tasks.append(asyncio.create_task(recheck, name="auth-recheck"))

    async def _listen(self) -> Server:
        s = self.settings
        return await serve(
            self.endpoint.handle,
            s.host,
            s.port,
            process_request=self.endpoint.process_request,
            max_size=s.max_frame_bytes,
            max_queue=16,
            compression=None,
            close_timeout=5,
            ping_interval=20,
            ping_timeout=20,
            server_header=None,
            # A handshake the client broke (a health check's bare TCP connect) is logged as the
            # client's doing; websockets' own lines go through a token scrubber.
            create_connection=ReportingConnection,
            logger=websockets_logger(),
        )

    async def stop(self) -> None:
        """Stop accepting, let replies finish within the grace period, close clients (1001)."""
        server, self.server = self.server, None
        if server is None:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        server.server.close()  # stop listening; connections stay open while replies finish
        await self.router.drain(self.settings.shutdown_grace_s)
        server.close(close_connections=True)  # 1001 going away to every client
        with contextlib.suppress(Exception):
            await server.wait_closed()
        await self.close_parts()

    async def close_parts(self) -> None:
        await self.mcp.stop()  # every session closed, every stdio child stopped
        await self.manager.close()
        await self.hub.close()
        await self.store.close()
        await self.engine.dispose()
        await self.llm.aclose()


def load_mcp_configs(settings: Settings) -> list[ServerConfig]:
    """The servers of `CORTEX_MCP_CONFIG`; a bad file stops the start, naming server and field."""
    if settings.mcp_config is None:
        return []
    try:
        return load_config(settings.mcp_config, os.environ)
    except McpConfigError as exc:
        raise StartupError(str(exc)) from None


@contextlib.asynccontextmanager
async def running(settings: Settings, *, llm: LlmService | None = None) -> AsyncIterator[Cortex]:
    """Start a Cortex server for the duration of the block (tests and `cortex serve`)."""
    app = Cortex(settings, llm=llm)
    try:
        await app.start()
    except BaseException:
        await app.close_parts()  # e.g. refused to start (AuthConfigError)
        raise
    try:
        yield app
    finally:
        await app.stop()
