"""The HTTP/WebSocket application (Starlette) and the process-wide gateway state."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from transcribe_gateway.config import Settings
from transcribe_gateway.providers.registry import ProviderRegistry
from transcribe_gateway.server import http, metrics
from transcribe_gateway.server.auth import KeyChecker
from transcribe_gateway.server.connection import Connection
from transcribe_gateway.server.limits import OPS_STOP_S, Admission
from transcribe_gateway.server.origins import OriginPolicy
from transcribe_gateway.server.tokens import TokenIssuer
from transcribe_gateway.store import open_store

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
"""The demo page and the browser client, shipped in the package."""

SHUTDOWN_LINGER_S = 0.5
"""On SIGTERM, audio still arriving this long is transcribed too (frames in flight)."""
DRAIN_MARGIN_S = 2.0
"""Past a session's own bound (linger, then ``drain_timeout_s`` of engine
silence): time for its last events and ``session.closed`` to go out."""
CLEANUP_WAIT_S = 10.0
"""At exit, how long sessions closed by it may take to free their engines and
write their usage records before the store closes."""


class Gateway:
    """Everything the connections share: settings, engines, keys, live sessions."""

    def __init__(self, settings: Settings, registry: ProviderRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ProviderRegistry.discover(settings)
        self.keys = KeyChecker(settings.keys())
        self.origins = OriginPolicy(settings.allowed_origins, public_key=settings.public_key)
        """Which web pages may open ``/ws``."""
        self.connections: set[Connection] = set()
        self.draining = False
        self.store = open_store(settings.store)
        """Keys, usage and per-key live state (SQLite, or Redis for replicas)."""
        self.admission = Admission(settings, self.store)
        # The store is the token ledger: single use holds across restarts (SQLite's
        # file) and across replicas (Redis).
        self.tokens = TokenIssuer(settings.token_secret, settings.token_max_ttl_s, self.store)
        """Short-lived session tokens for browsers (``POST /v1/tokens``)."""
        self._ops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.store.start()
        await self.registry.start()
        self._ops = [
            asyncio.create_task(self.admission.run(self.connections), name="ops-tick"),
            asyncio.create_task(metrics.watch_loop_lag(), name="loop-lag"),
        ]

    def drain_grace_s(self) -> float:
        """How long a SIGTERM drain waits for the sessions: each is cut off by its
        own bound first (an engine silent for ``drain_timeout_s`` gets
        ``provider_error``, then ``session.closed``), so the drain waits longer."""
        return SHUTDOWN_LINGER_S + self.settings.drain_timeout_s + DRAIN_MARGIN_S

    async def aclose(self) -> None:
        # Sessions the drain did not finish were closed by the exit (1012): their
        # cleanup closes their engines and writes their usage records (billing),
        # which needs the store still open.
        live = list(self.connections)
        for conn in live:
            conn.abandon()
        await _wait_closed(live, CLEANUP_WAIT_S)
        for task in self._ops:
            task.cancel()
        # Bounded: a task whose cancellation a callee swallowed (asyncio.wait_for in
        # redis-py on Python 3.11) could otherwise hold up the exit for ever.
        if self._ops:
            done, stuck = await asyncio.wait(self._ops, timeout=OPS_STOP_S)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s failed", task.get_name(), exc_info=task.exception())
            for task in stuck:
                log.error(
                    "%s did not stop within %g s; exiting without it", task.get_name(), OPS_STOP_S
                )
        await self.registry.aclose()
        await self.store.aclose()

    async def drain(self, grace_s: float) -> None:
        """Stop taking sessions; let open ones finalize and get ``session.closed``."""
        self.draining = True
        live = list(self.connections)
        log.info("draining", extra={"sessions": len(live)})
        for conn in live:
            conn.begin_end("shutdown", linger_s=SHUTDOWN_LINGER_S)
        await _wait_closed(live, grace_s)
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


async def _wait_closed(connections: list[Connection], timeout_s: float) -> None:
    """Wait until every one of ``connections`` is over, or ``timeout_s`` passed."""
    waiters = [asyncio.create_task(conn.closed.wait()) for conn in connections]
    if waiters:
        await asyncio.wait(waiters, timeout=timeout_s)
    for waiter in waiters:
        waiter.cancel()


_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _post_route(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> Route:
    """A POST-only route that answers other methods 405 itself: with Starlette's
    ``methods=["POST"]`` the demo's catch-all mount answered them (a GET got 404)."""

    async def handle(request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("Method Not Allowed", 405, headers={"Allow": "POST"})
        return await endpoint(request)

    return Route(path, handle, methods=_METHODS)


WEB_HEADERS: Final = {
    # The page takes the microphone: no other site may frame it (clickjacking), it
    # runs only its own files, and it talks only to this server.
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class WebFiles(StaticFiles):
    """The demo page's files, with :data:`WEB_HEADERS`."""

    def file_response(
        self,
        full_path: os.PathLike[str] | str,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(WEB_HEADERS)
        return response


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
            _post_route("/v1/tokens", functools.partial(http.create_token, gw)),
            Route("/v1/providers", functools.partial(http.providers, gw)),
            *(
                [_post_route("/demo/token", functools.partial(http.demo_token, gw))]
                if settings.profile == "development"
                else []
            ),
            # The demo page and the browser client (last: it answers every other path).
            Mount("/", WebFiles(directory=WEB_DIR, html=True), name="web"),
        ],
        lifespan=lifespan,
    )
    app.state.gateway = gw
    return app
