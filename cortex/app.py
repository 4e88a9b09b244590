"""Cortex assembled: settings in, a running server out. No import-time globals."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from .access import Gate, OriginPolicy, presented_token
from .auth import LOCAL_USER, Authenticator, Principal, auth_required, parse_env_tokens
from .config import Settings
from .errors import CortexError, StartupError
from .handshakes import ReportingConnection, websockets_logger
from .hub import Hub
from .leases import RedisLeases
from .llm import LlmService
from .logs import event
from .manage import ConversationManager
from .metrics import Metrics
from .redis_hub import RedisHub
from .router import Router
from .server import Connection
from .store import Store, TokenStore, make_engine, migrate
from .telemetry import Telemetry
from .tools import ToolRegistry, build_registry
from .web import WS_PATH, HttpRoutes, error_response, respond

log = logging.getLogger("cortex")
log_http = logging.getLogger("cortex.http")
METRICS_PATH = "/metrics"

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
        self.hub: Hub
        leases: RedisLeases | None = None
        if settings.redis_url is not None:
            redis_hub = RedisHub(settings.redis_url.get_secret_value())
            leases = RedisLeases(redis_hub.redis, ttl=settings.reply_lease_s)
            self.hub = redis_hub
        else:
            self.hub = Hub()
        self.llm = llm or LlmService(settings)
        self.tools: ToolRegistry = build_registry(
            modules=settings.tool_modules, enabled=settings.tools
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
            router=self.router,
            hub=self.hub,
            llm=self.llm,
            telemetry=self.telemetry,
        )
        self.metrics.watch(subscriptions=self.hub.subscriber_count, replies=self.router.in_progress)
        self.http = HttpRoutes(self)
        self.tokens = TokenStore(self.engine, observe=self.metrics.observe_db)
        self.gate: Gate | None = None  # built in start(): it reads the tokens table
        # Who each handshake authenticated as, from process_request() until the handler runs.
        self._handshakes: WeakKeyDictionary[ServerConnection, Principal] = WeakKeyDictionary()
        # Open connections and who they speak for (the connection limit counts these).
        self.connections: dict[Connection, Principal] = {}
        self._recheck: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.server: Server | None = None
        self._port: int | None = None

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

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """HTTP routes, and the access check of every `/ws`, `/api/` and `/metrics` request."""
        assert self.gate is not None
        started = time.monotonic()
        path = urlsplit(request.path).path  # never the query: it may hold a token
        user: str | None = None
        if path == METRICS_PATH:
            response: Response | None = await self._metrics(request, connection)
        elif path != WS_PATH and not path.startswith("/api/"):
            response = await self.http.handle(request, None)  # public: page, static, health
        else:
            remote = _remote(connection)
            verdict = await self.gate.check(request, remote, websocket=path == WS_PATH)
            if isinstance(verdict, Response):
                return verdict  # the gate logs refusals itself
            user = verdict.user
            response = await self.http.handle(request, user)
            if response is None:
                self._handshakes[connection] = verdict  # the upgrade goes on; handle() takes it
                return None
        if response is not None:
            event(
                log_http,
                "http",
                logging.INFO if path.startswith("/api/") else logging.DEBUG,
                path=path,
                status=response.status_code,
                user=user,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
        return response

    async def _metrics(self, request: Request, connection: ServerConnection) -> Response:
        """`GET /metrics`. Public with `metrics_public`; only `metrics_token` when that is set;
        otherwise the same access as `/api/` (any user's token when auth is on)."""
        s = self.settings
        if s.metrics_token is not None and not s.metrics_public:
            token = presented_token(request, allow_query=False) or ""
            expected = s.metrics_token.get_secret_value()
            if not hmac.compare_digest(token.encode(), expected.encode()):
                response = error_response(401, "unauthorized", "the metrics token is required")
                response.headers["WWW-Authenticate"] = 'Bearer realm="cortex-metrics"'
                return response
        elif not s.metrics_public:
            assert self.gate is not None
            verdict = await self.gate.check(request, _remote(connection), websocket=False)
            if isinstance(verdict, Response):
                return verdict
        body, content_type = self.metrics.render()
        return respond(200, body, content_type)

    async def handle(self, ws: ServerConnection) -> None:
        principal = self._handshakes.pop(ws, None)
        if principal is None:  # fail closed: every upgrade must have passed the gate
            await ws.close(CloseCode.POLICY_VIOLATION, "unauthorized")
            return
        if len(self.connections) >= self.settings.max_connections:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "server is at its connection limit")
            return
        connection = Connection(self, ws, principal.user)
        self.connections[connection] = principal
        self.telemetry.connection_opened(
            connection.id, user=principal.user, remote=_remote(ws), via=principal.via
        )
        try:
            await connection.serve()
        finally:
            self.connections.pop(connection, None)
            self.telemetry.connection_closed(
                connection.id,
                user=principal.user,
                seconds=time.monotonic() - connection.opened,
                frames_in=connection.frames_in,
                frames_out=connection.frames_out,
                code=ws.close_code,
                reason=ws.close_reason,
            )

    async def _sweep(self) -> None:
        """Every `sweep_interval_s`: answer what nobody answers, leave idle Redis channels."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.router.sweep()
                await self.hub.housekeeping()
            except CortexError:
                log.warning("could not look for unanswered messages", exc_info=True)

    async def _recheck_tokens(self) -> None:
        """Close sessions whose stored token was revoked after they connected.

        New handshakes see a revocation at once; open sockets are checked every
        `auth_recheck_s`, since the CLI that revokes runs in another process.
        """
        while True:
            await asyncio.sleep(self.settings.auth_recheck_s)
            ids = {p.token_id for p in self.connections.values() if p.token_id is not None}
            if not ids:
                continue
            try:
                revoked = await self.tokens.revoked_among(ids)
            except CortexError:
                log.warning("could not check open sessions for revoked tokens", exc_info=True)
                continue
            for connection, principal in list(self.connections.items()):
                if principal.token_id in revoked:
                    log.info(
                        "closing connection %d of user %s: token %d was revoked",
                        connection.id,
                        principal.user,
                        principal.token_id,
                    )
                    connection.close(CloseCode.POLICY_VIOLATION, "token revoked")

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.settings.database_url)
        self.gate = await self.build_gate()
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
        self._sweeper = asyncio.create_task(self._sweep(), name="sweeper")
        if self.gate.authenticator.required:
            self._recheck = asyncio.create_task(self._recheck_tokens(), name="auth-recheck")

    async def _listen(self) -> Server:
        s = self.settings
        return await serve(
            self.handle,
            s.host,
            s.port,
            process_request=self.process_request,
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
        for task in (self._recheck, self._sweeper):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        server.server.close()  # stop listening; connections stay open while replies finish
        await self.router.drain(self.settings.shutdown_grace_s)
        server.close(close_connections=True)  # 1001 going away to every client
        with contextlib.suppress(Exception):
            await server.wait_closed()
        await self.manager.close()
        await self.hub.close()
        await self.store.close()
        await self.engine.dispose()


@contextlib.asynccontextmanager
async def running(settings: Settings, *, llm: LlmService | None = None) -> AsyncIterator[Cortex]:
    """Start a Cortex server for the duration of the block (tests and `cortex serve`)."""
    app = Cortex(settings, llm=llm)
    try:
        await app.start()
    except BaseException:
        await app.hub.close()
        await app.store.close()
        await app.engine.dispose()  # e.g. refused to start (AuthConfigError)
        raise
    try:
        yield app
    finally:
        await app.stop()


def _remote(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else "unknown"
