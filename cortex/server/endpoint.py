"""The server's one port: every HTTP request and WebSocket handshake comes through here.

`process_request` (websockets' hook) answers HTTP routes and asks the gate about every `/ws`,
`/api/` and `/metrics` request; `handle` turns an upgraded socket into a `Connection`. Open
sessions whose stored token is revoked are closed here too.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ..auth.gate import Gate, Refusal, presented_token
from ..auth.tokens import Principal
from ..config import Settings
from ..errors import CortexError
from ..fanout.hub import Hub
from ..ops.logs import event
from ..ops.metrics import Metrics
from ..ops.telemetry import Telemetry
from ..pipeline.files import Files
from ..store.tokens import TokenStore
from .connection import Connection
from .dispatch import DispatchTable
from .responses import error_response, refusal_response, respond
from .routes import WS_PATH, HttpRoutes

log = logging.getLogger("cortex")
log_http = logging.getLogger("cortex.http")
METRICS_PATH = "/metrics"


class Endpoint:
    """HTTP routes, the access check, and the open WebSocket connections of one process."""

    def __init__(
        self,
        *,
        settings: Settings,
        routes: HttpRoutes,
        dispatch: DispatchTable,
        hub: Hub,
        metrics: Metrics,
        telemetry: Telemetry,
        tokens: TokenStore,
        files: Files | None = None,
    ) -> None:
        self.files = files  # attachments: each connection's uploads store through it
        self.settings = settings
        self.routes = routes
        self.dispatch = dispatch
        self.hub = hub
        self.metrics = metrics
        self.telemetry = telemetry
        self.tokens = tokens
        self.gate: Gate | None = None  # set once the tokens table has been read (start-up)
        # Who each handshake authenticated as, from process_request() until the handler runs.
        self._handshakes: WeakKeyDictionary[ServerConnection, Principal] = WeakKeyDictionary()
        # Open connections and who they speak for (the connection limit counts these).
        self.connections: dict[Connection, Principal] = {}

    async def _check(
        self, request: Request, connection: ServerConnection, *, websocket: bool
    ) -> Principal | Refusal:
        assert self.gate is not None, "the gate is built at start-up"
        return await self.gate.check(request, remote_of(connection), websocket=websocket)

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """HTTP routes, and the access check of every `/ws`, `/api/` and `/metrics` request.

        GET and HEAD are served (HEAD: the same status and headers, no body); every other
        method is 405. websockets hands over requests of any method.
        """
        if request.method == "GET":
            return await self._get(connection, request)
        if request.method == "HEAD":
            response = await self._get(connection, request)
            if response is None:  # an upgrade asked for with HEAD
                return error_response(400, "bad_request", "WebSocket upgrades use GET")
            return Response(response.status_code, response.reason_phrase, response.headers, b"")
        response = error_response(405, "method_not_allowed", "this server answers GET and HEAD")
        response.headers["Allow"] = "GET, HEAD"
        return response

    async def _get(self, connection: ServerConnection, request: Request) -> Response | None:
        started = time.monotonic()
        path = urlsplit(request.path).path  # never the query: it may hold a token
        user: str | None = None
        if path == METRICS_PATH:
            response: Response | None = await self._metrics(request, connection)
        elif path != WS_PATH and not path.startswith("/api/"):
            response = await self.routes.handle(request, None)  # public: page, static, health
        else:
            verdict = await self._check(request, connection, websocket=path == WS_PATH)
            if isinstance(verdict, Refusal):
                return refusal_response(verdict)  # the gate logs refusals itself
            user = verdict.user
            response = await self.routes.handle(request, user)
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
            verdict = await self._check(request, connection, websocket=False)
            if isinstance(verdict, Refusal):
                return refusal_response(verdict)
        body, content_type = self.metrics.render()
        return respond(200, body, content_type)

    async def handle(self, ws: ServerConnection) -> None:
        """An upgraded socket: serve it as a `Connection` until it closes."""
        principal = self._handshakes.pop(ws, None)
        if principal is None:  # fail closed: every upgrade must have passed the gate
            await ws.close(CloseCode.POLICY_VIOLATION, "unauthorized")
            return
        if len(self.connections) >= self.settings.max_connections:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "server is at its connection limit")
            return
        connection = Connection(
            ws,
            principal.user,
            settings=self.settings,
            dispatch=self.dispatch,
            hub=self.hub,
            metrics=self.metrics,
            files=self.files,
        )
        self.connections[connection] = principal
        self.telemetry.connection_opened(
            connection.id, user=principal.user, remote=remote_of(ws), via=principal.via
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

    async def recheck_tokens(self) -> None:
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


def remote_of(connection: ServerConnection) -> str:
    address: Any = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else "unknown"
