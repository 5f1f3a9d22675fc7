"""The HTTP/WebSocket application (Starlette) and the process-wide gateway state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from transcribe_gateway.config import Settings
from transcribe_gateway.providers.registry import ProviderRegistry
from transcribe_gateway.server.auth import KeyChecker
from transcribe_gateway.server.connection import Connection

log = logging.getLogger(__name__)

SHUTDOWN_LINGER_S = 0.5
"""On SIGTERM, audio still arriving this long is transcribed too (frames in flight)."""


class Gateway:
    """Everything the connections share: settings, engines, keys, live sessions."""

    def __init__(self, settings: Settings, registry: ProviderRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ProviderRegistry.discover(settings)
        self.keys = KeyChecker(settings.keys())
        self.connections: set[Connection] = set()
        self.draining = False

    async def start(self) -> None:
        await self.registry.start()

    async def aclose(self) -> None:
        await self.registry.aclose()

    async def drain(self, grace_s: float) -> None:
        """Stop taking sessions; let open ones finalize and get ``session.closed``."""
        self.draining = True
        live = list(self.connections)
        log.info("draining", extra={"sessions": len(live)})
        for conn in live:
            conn.begin_end("shutdown", linger_s=SHUTDOWN_LINGER_S)
        waiters = [asyncio.create_task(conn.closed.wait()) for conn in live]
        if waiters:
            await asyncio.wait(waiters, timeout=grace_s)
        for waiter in waiters:
            waiter.cancel()
        log.info("drained", extra={"left": len(self.connections)})

    async def handle_ws(self, ws: WebSocket) -> None:
        await Connection(ws, self).run()

    async def healthz(self, request: Request) -> JSONResponse:
        engines = {name: getattr(stt, "active", {}) for name, stt in self.registry.engines.items()}
        return JSONResponse(
            {
                "status": "draining" if self.draining else "ok",
                "ready": self.registry.is_ready(),
                "sessions": len(self.connections),
                "streams": engines,
            }
        )


def create_app(settings: Settings, gateway: Gateway | None = None) -> Starlette:
    """Build the ASGI app: ``GET /ws`` (WebSocket) and ``GET /healthz``."""
    gw = gateway or Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.aclose()

    app = Starlette(
        routes=[
            WebSocketRoute("/ws", gw.handle_ws),
            Route("/healthz", gw.healthz),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
