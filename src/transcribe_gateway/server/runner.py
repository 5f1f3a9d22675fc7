"""Run the app under uvicorn, with a graceful SIGTERM drain.

uvicorn's own shutdown closes open WebSockets with 1012 at once; a gateway must
first let every session finalize its pending audio and send ``session.closed``.
So the first SIGTERM/SIGINT/SIGHUP drains (bounded by ``drain_timeout_s``),
then lets uvicorn shut down; a second signal stops the wait (open sessions are
closed 1012, their engines closed and their usage written, bounded). The
process then exits 0. During the drain the socket still accepts: the health
probes answer (``draining``), and a new WebSocket is closed with 1012.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ConfigError
from transcribe_gateway.server.app import Gateway, create_app
from transcribe_gateway.server.ws_transport import websocket_protocol

log = logging.getLogger(__name__)

STARTUP_FAILURE = 3
"""Exit status when listening fails, as uvicorn's own (``uvicorn.server``)."""


class GatewayServer(uvicorn.Server):
    """uvicorn server whose exit signal drains the gateway first."""

    def __init__(
        self, config: uvicorn.Config, gateway: Gateway, on_ready: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self._on_ready = on_ready
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)  # type: ignore[arg-type]
        except OSError as exc:
            # Sockets from bind_sockets listen only now: with SO_REUSEADDR another
            # process could bind the same port meanwhile and listen first. One line
            # and exit 3, as uvicorn does when its own bind fails.
            log.error("cannot listen (port %s): %s", self.config.port, exc)
            await self.lifespan.shutdown()
            sys.exit(STARTUP_FAILURE)
        if self.started and self._on_ready is not None and not self._draining:
            # Listening, engines loaded: whatever on_ready tells a user to try works
            # now (not once a signal came while they loaded: the server is leaving).
            self._on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # SIGHUP too (a closed terminal, a `kill -HUP` meant as a reload): by
        # default it kills the process, with no drain and no usage written.
        hup = getattr(signal, "SIGHUP", None)
        if hup is None or threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        previous = signal.signal(hup, self.handle_exit)
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(hup, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after
        # shutdown and the process would die by the signal instead of exiting 0.
        if self._draining or self._loop is None:
            self.should_exit = True
            if self._draining:
                self.force_exit = True
            return
        # Set before anything else: a second signal can run this handler again,
        # nested inside this call (Python runs handlers between bytecodes).
        self._draining = True
        log.info("signal received; draining", extra={"signal": signal.Signals(sig).name})
        self._drain_task = self._loop.create_task(self._drain())

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets)
        if self._drain_task is not None:
            self._drain_task.cancel()  # a forced exit leaves it waiting for the sessions
        shut = getattr(self.lifespan, "shutdown_event", None)
        if self.force_exit and not (shut is not None and shut.is_set()):
            # uvicorn skips the app's shutdown on a forced exit; the app's lifespan
            # task was then cancelled at exit, logging a traceback at ERROR. The
            # gateway's cleanup is bounded (CLEANUP_WAIT_S, USAGE_FLUSH_S) and closes
            # the engines and writes the usage records: run it.
            await self.lifespan.shutdown()

    async def _drain(self) -> None:
        # Still listening: /healthz and /readyz answer (draining), and a client that
        # connects now is told to go elsewhere (1012) rather than refused by TCP.
        try:
            await self.gateway.drain(self.gateway.drain_grace_s())
        finally:
            self.should_exit = True


def build_server(settings: Settings, on_ready: Callable[[], None] | None = None) -> GatewayServer:
    gateway = Gateway(settings)
    app = create_app(settings, gateway)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Frames between max_message_bytes and 4x it reach the session and get a
        # 1008 close; beyond that the WebSocket layer itself closes with 1009.
        ws_max_size=4 * settings.max_message_bytes,
        ws_per_message_deflate=False,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ws=websocket_protocol(gateway),  # /ws on picows (server/ws_transport.py)
        loop=settings.event_loop,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return GatewayServer(config, gateway, on_ready)


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind ``host``:``port`` as uvicorn's ``loop.create_server`` would (every address
    the host resolves to, ``SO_REUSEADDR`` on POSIX, IPv6 sockets IPv6-only), not
    listening yet: uvicorn binds only after the models load, so a port in use or a
    bad host failed late, with a message naming neither setting.

    Raises:
        ConfigError: the host does not resolve, or an address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"host: cannot resolve {host!r}: {reason} (TRANSCRIBE_HOST, serve --host)"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # deduplicated, in order
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this machine lacks (asyncio skips it too)
            sockets.append(sock)
            if os.name == "posix" and sys.platform != "cygwin":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ConfigError(_bind_error(host, port, address, exc)) from None
        if not sockets:
            raise ConfigError(f"host: no address of {host!r} can be used (TRANSCRIBE_HOST)")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_error(host: str, port: int, address: tuple[object, ...], exc: OSError) -> str:
    """One line naming the setting at fault: ``port`` when it is taken or privileged."""
    where = f"[{address[0]}]:{port}" if ":" in str(address[0]) else f"{address[0]}:{port}"
    reason = exc.strerror or str(exc)
    named = where if str(address[0]) == host else f"{host} ({where})"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port: {where} is already in use (another server?); pick another port "
            "(TRANSCRIBE_PORT, serve --port)"
        )
    if exc.errno == errno.EACCES:
        return f"port: cannot listen on {where}: {reason} (TRANSCRIBE_PORT, serve --port)"
    return f"host: cannot listen on {named}: {reason} (TRANSCRIBE_HOST, serve --host)"


def serve(
    settings: Settings,
    on_ready: Callable[[], None] | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT/SIGHUP (blocking); ``on_ready`` is called once it is listening.

    ``sockets``: bound by :func:`bind_sockets` (uvicorn listens on them); without,
    uvicorn binds ``host``:``port`` itself once the models are loaded.
    """
    build_server(settings, on_ready).run(sockets=sockets)
