"""Cortex assembled: settings in, a running server out. No import-time globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .config import Settings
from .hub import Hub
from .llm import LlmService
from .router import Router
from .server import Connection
from .store import Store, make_engine, migrate
from .tools import ToolRegistry, build_registry
from .web import HttpRoutes

log = logging.getLogger("cortex")

LOCAL_USER = "local"


class Cortex:
    """The parts of one server process, wired together from one `Settings`."""

    def __init__(self, settings: Settings, *, llm: LlmService | None = None) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self.store = Store(self.engine)
        self.hub = Hub()
        self.llm = llm or LlmService(settings)
        self.tools: ToolRegistry = build_registry(
            modules=settings.tool_modules, enabled=settings.tools
        )
        self.router = Router(
            settings=settings, store=self.store, llm=self.llm, hub=self.hub, tools=self.tools
        )
        self.http = HttpRoutes(self)
        self.server: Server | None = None
        self._port: int | None = None
        self.connections: set[Connection] = set()

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
        return await self.store.ping()

    def owner_of(self, request: Request) -> str | None:
        """The user a request speaks for (auth comes in its own module)."""
        return LOCAL_USER

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        return await self.http.handle(request, self.owner_of(request))

    async def handle(self, ws: ServerConnection) -> None:
        owner = self.owner_of(ws.request) if ws.request is not None else None
        if owner is None:
            await ws.close(1008, "unauthorized")
            return
        if len(self.connections) >= self.settings.max_connections:
            await ws.close(1013, "server is at its connection limit; try again later")
            return
        connection = Connection(self, ws, owner)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def start(self) -> None:
        await asyncio.to_thread(migrate, self.settings.database_url)
        recovered = await self.store.recover_interrupted()
        if recovered:
            log.warning(
                "marked %d replies left streaming by a previous process as interrupted", recovered
            )
        s = self.settings
        self.server = await serve(
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
        )

    async def stop(self) -> None:
        """Stop accepting, let replies finish within the grace period, close clients (1001)."""
        server, self.server = self.server, None
        if server is None:
            return
        server.server.close()  # stop listening; connections stay open while replies finish
        await self.router.drain(self.settings.shutdown_grace_s)
        server.close(close_connections=True)  # 1001 going away to every client
        with contextlib.suppress(Exception):
            await server.wait_closed()
        await self.engine.dispose()


@contextlib.asynccontextmanager
async def running(settings: Settings, *, llm: LlmService | None = None) -> AsyncIterator[Cortex]:
    """Start a Cortex server for the duration of the block (tests and `cortex serve`)."""
    app = Cortex(settings, llm=llm)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
