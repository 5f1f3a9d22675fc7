"""The ``/ws`` transport: picows WebSocket framing under uvicorn's HTTP server.

uvicorn serves HTTP (the Starlette routes) and hands every WebSocket upgrade
to the protocol class of its ``ws`` setting, replaying the upgrade request into
it.  That class here is picows' protocol: frames are parsed in Cython and given
to a listener one call per frame, with no coroutine, queue or task per
message.  The Python WebSocket stacks under uvicorn cost about twice the CPU
per 20 ms audio chunk, which capped a core at ~400 live streams
(BENCHMARKS.md).  :class:`WebSocketLink` turns the frames into calls on a
:class:`~transcribe_gateway.server.connection.Connection` and carries what the
connection writes back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from picows import (
    WSAutoPingStrategy,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

# The server-side protocol class ws_create_server() builds per connection. It is
# not re-exported by picows, and its constructor is positional: the dependency
# is pinned to a minor release (pyproject.toml) and every test goes through it.
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from transcribe_gateway.protocol.messages import clip_echo
from transcribe_gateway.server.connection import Connection

if TYPE_CHECKING:
    from transcribe_gateway.server.app import Gateway

log = logging.getLogger(__name__)

PATH: Final = b"/ws"
HANDSHAKE_TIMEOUT_S: Final = 5.0
FORBIDDEN: Final = 403
CLOSE_REPLY_TIMEOUT_S: Final = 5.0
"""After our close frame, how long the client has to answer before the socket is cut."""
PROTOCOL_ERROR: Final = 1002
INVALID_TEXT: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
SERVICE_RESTART: Final = 1012


class WebSocketLink(WSListener):  # type: ignore[misc]  # picows ships no stubs for subclassing
    """One ``/ws`` connection: picows frames in, the session's text frames out.

    Messages split in fragments are joined here (bounded by the frame size
    limit).  The connection writes through :meth:`send_text` without waiting:
    while the socket's buffer is over its high-water mark :attr:`writable` is
    False and the connection holds (or drops) frames itself.
    """

    def __init__(self, gateway: Gateway, request: WSUpgradeRequest, max_size: int) -> None:
        self._gateway = gateway
        self._authorization: str | None = request.headers.get("authorization")
        self._max_size = max_size
        self._ws: WSTransport | None = None
        self._conn: Connection | None = None
        self._fragments = bytearray()
        """The fragmented message so far (a list of frames grew with each empty one)."""
        self._fragment_type = WSMsgType.TEXT
        self._assembling = False
        """Inside a fragmented message (its first frame came, not yet its last)."""
        self._closing = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.writable = True
        """False while the socket's send buffer is over its high-water mark."""
        self._reading_paused = False

    # ---------------------------------------------------------- from picows

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._conn = Connection(self, self._gateway, authorization=self._authorization)
        self._conn.opened()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        conn = self._conn
        assert conn is not None
        kind = frame.msg_type
        if kind is WSMsgType.TEXT and frame.fin and not self._assembling:  # each audio chunk
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self.close(INVALID_TEXT, "text frame is not valid UTF-8")
                return
            conn.receive(text)
        elif kind is WSMsgType.CLOSE:
            if not self._closing:  # the client ends: answer its close, then hang up
                self._closing = True
                transport.send(WSMsgType.CLOSE, frame.get_payload_as_bytes()[:2])
            transport.disconnect()
        elif kind is WSMsgType.BINARY and frame.fin and not self._assembling:
            conn.receive(frame.get_payload_as_bytes())
        elif kind in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            self._on_fragment(kind, frame)
        # PING is answered by picows; PONG needs nothing.

    def _on_fragment(self, kind: WSMsgType, frame: WSFrame) -> None:
        starts = kind is not WSMsgType.CONTINUATION
        if starts == self._assembling:  # RFC 6455 5.4: a continuation needs a start, and vice versa
            self.close(
                PROTOCOL_ERROR,
                "unexpected continuation frame"
                if not starts
                else "new message inside a fragmented one",
            )
            return
        if starts:
            self._fragment_type, self._fragments = kind, bytearray()
            self._assembling = True
        if len(self._fragments) + frame.payload_size > self._max_size:
            self._fragments, self._assembling = bytearray(), False
            self.close(MESSAGE_TOO_BIG, "message too big")
            return
        self._fragments += frame.get_payload_as_memoryview()
        if not frame.fin:
            return
        data, self._fragments, self._assembling = bytes(self._fragments), bytearray(), False
        assert self._conn is not None
        if self._fragment_type is WSMsgType.BINARY:
            self._conn.receive(data)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.close(INVALID_TEXT, "text frame is not valid UTF-8")
            return
        self._conn.receive(text)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._conn is not None:
            self._conn.disconnected()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        if self._conn is not None:
            self._conn.resumed_writing()

    # ------------------------------------------------------ for Connection

    def send_text(self, text: str) -> None:
        if self._ws is not None and not self._closing:
            self._ws.send(WSMsgType.TEXT, text.encode())

    def close(self, code: int, reason: str) -> None:
        """Send our close frame; the socket ends at the client's answer or after a timeout."""
        if self._ws is None or self._closing:
            return
        self._closing = True
        # Any code goes on the wire (4001, 4029); the stub lists only registered ones.
        self._ws.send_close(code, reason.encode()[:123])  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_REPLY_TIMEOUT_S, self._ws.disconnect, False)

    def send_user_specific_ping(self, transport: WSTransport) -> None:
        """picows' keepalive, for a client it heard nothing from for a while."""
        if self._reading_paused:
            # It is this server that stopped reading (an engine pushes back): the
            # client's pong would wait behind the audio it sent, and the session
            # be closed for our stall. Taken as answered (after picows marks the
            # ping as awaiting its pong).
            asyncio.get_running_loop().call_soon(transport.notify_user_specific_pong_received)
            return
        transport.send_ping()

    def pause_reading(self) -> None:
        if self._ws is not None:
            self._reading_paused = True
            self._ws.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        if self._ws is not None and not self._ws.is_disconnected:
            self._reading_paused = False
            self._ws.underlying_transport.resume_reading()


def websocket_protocol(gateway: Gateway) -> type[Any]:
    """The protocol class for uvicorn's ``ws`` setting, serving ``/ws`` for ``gateway``."""

    class GatewayWebSocketProtocol(WSProtocol):  # type: ignore[misc]
        """picows' server protocol, built the way uvicorn builds a ``ws`` protocol."""

        def __init__(
            self, config: Any, server_state: Any, app_state: Any, _loop: Any = None
        ) -> None:
            max_size = config.ws_max_size
            ping_interval = config.ws_ping_interval

            def listener(
                request: WSUpgradeRequest,
            ) -> WebSocketLink | WSUpgradeResponseWithListener | None:
                if request.path.partition(b"?")[0] != PATH:
                    return None  # picows answers 404
                origin = request.headers.get("origin")
                if not gateway.origins.allows(origin, request.headers.get("host")):
                    shown = clip_echo(origin) if origin is not None else None  # a client's
                    log.info("websocket refused: origin not allowed", extra={"origin": shown})
                    refusal = WSUpgradeResponse.create_error_response(
                        FORBIDDEN, b"this origin may not use the gateway (allowed_origins)"
                    )
                    return WSUpgradeResponseWithListener(refusal, None)
                return WebSocketLink(gateway, request, max_size)

            super().__init__(
                None,  # host:port (client side only)
                None,  # path (client side only)
                False,  # is_client_side
                listener,
                logging.getLogger("picows.server"),
                True,  # disconnect_on_exception: an unexpected error closes 1011
                HANDSHAKE_TIMEOUT_S,
                ping_interval is not None,  # auto ping: finds clients that vanished
                ping_interval or 20.0,
                min(config.ws_ping_timeout or 20.0, ping_interval or 20.0),
                WSAutoPingStrategy.PING_WHEN_IDLE,
                True,  # auto pong
                max_size,
                None,  # extra response headers
                16 * 1024,  # initial read buffer (grows as needed)
            )
            self._connections: set[Any] = server_state.connections

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._connections.add(self)  # uvicorn waits for these at shutdown
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            # uvicorn replays the upgrade request once, as bytes; picows reads into
            # its own buffer (BufferedProtocol), so copy it there.
            view = memoryview(data)
            while view:
                buffer = self.get_buffer(len(view))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                self.buffer_updated(size)
                view = view[size:]

        def connection_lost(self, exc: Exception | None) -> None:
            self._connections.discard(self)
            super().connection_lost(exc)

        def shutdown(self) -> None:
            # uvicorn's exit, after the gateway's drain: a session still open is
            # told to reconnect elsewhere (1012); one already closing just ends.
            if isinstance(self.listener, WebSocketLink):
                self.listener.close(SERVICE_RESTART, "server shutting down")
            if self.transport is not None:
                self.transport.disconnect()

    return GatewayWebSocketProtocol
