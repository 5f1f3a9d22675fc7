"""The HTTP/WebSocket application (Starlette) and the process-wide gateway state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from transcribe_gateway.config import Settings
from transcribe_gateway.providers.registry import ProviderRegistry
from transcribe_gateway.server import http, metrics
from transcribe_gateway.server.auth import KeyChecker
from transcribe_gateway.server.connection import Connection
from transcribe_gateway.server.limits import Admission
from transcribe_gateway.server.tokens import TokenIssuer
from transcribe_gateway.store import open_store
from transcribe_gateway.store.redis import RedisStore

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
"""The demo page and the browser client, shipped in the package."""

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
        self.store = open_store(settings.store)
        """Keys, usage and per-key live state (SQLite, or Redis for replicas)."""
        self.admission = Admission(settings, self.store)
        # With Redis, single use holds across replicas: the store is the token ledger.
        ledger = self.store if isinstance(self.store, RedisStore) else None
        self.tokens = TokenIssuer(settings.token_secret, settings.token_max_ttl_s, ledger)
        """Short-lived session tokens for browsers (``POST /v1/tokens``)."""
        self._ops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.store.start()
        await self.registry.start()
        self._ops = [
            asyncio.create_task(self.admission.run(self.connections), name="ops-tick"),
            asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag"),
        ]

    async def aclose(self) -> None:
        for task in self._ops:
            task.cancel()
        for task in self._ops:
            with contextlib.suppress(BaseException):
                await task
        await self.registry.aclose()
        await self.store.aclose()

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

    async def healthz(self, request: Request) -> JSONResponse:
        engines = {name: getattr(stt, "active", {}) for name, stt in self.registry.engines.items()}
        return JSONResponse(
            {
                "status": "draining" if self.draining else "ok",
                "ready": self.registry.is_ready(),
                "sessions": len(self.connections),
                "streams": engines,
                # Leak checks (bench/soak.py): every task is owned by a session or the server.
                "tasks": len(asyncio.all_tasks()),
                "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            }
        )


def create_app(settings: Settings, gateway: Gateway | None = None) -> Starlette:
    """Build the ASGI app: the HTTP routes (``/ws`` is served by :mod:`.ws_transport`)."""
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
            Route("/healthz", gw.healthz),
            Route("/readyz", functools.partial(http.readyz, gw)),
            Route("/metrics", functools.partial(http.metrics_text, gw)),
            Route("/v1/usage", functools.partial(http.usage, gw)),
            Route("/v1/tokens", functools.partial(http.create_token, gw), methods=["POST"]),
            Route("/v1/providers", functools.partial(http.providers, gw)),
            *(
                [Route("/demo/token", functools.partial(http.demo_token, gw), methods=["POST"])]
                if settings.profile == "development"
                else []
            ),
            # The demo page and the browser client (last: it answers every other path).
            Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
