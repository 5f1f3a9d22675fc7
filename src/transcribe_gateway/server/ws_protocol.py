"""uvicorn's sans-I/O WebSocket protocol, reading a few messages ahead.

uvicorn pauses the socket after every message and resumes it when the app has
taken it: two ``epoll_ctl`` system calls per message.  A client streams a
message every 20 ms, so at a few hundred sessions that bookkeeping was about a
third of the gateway's CPU (py-spy, BENCHMARKS.md).  Here reading pauses only
once ``read_ahead`` messages wait for the app, which is still a bound: a client
that sends faster than its session consumes is held back by TCP as before.
"""

from __future__ import annotations

from typing import ClassVar

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class ReadAheadWebSocketProtocol(WebSocketsSansIOProtocol):
    read_ahead: ClassVar[int] = 16
    """Messages queued for the app before the socket is paused (1: uvicorn's own behaviour)."""

    def send_receive_event_to_app(self) -> None:
        paused = self.read_paused
        self.read_paused = True  # so the base class does not pause after this message
        super().send_receive_event_to_app()
        self.read_paused = paused
        # Once the app has sent its close, what is still queued will never be taken:
        # reading must go on so that the client's close reply ends the handshake.
        if not paused and not self.close_sent and self.queue.qsize() >= self.read_ahead:
            self.read_paused = True
            self.transport.pause_reading()


def with_read_ahead(messages: int) -> type[ReadAheadWebSocketProtocol]:
    """The protocol class for uvicorn's ``ws`` setting, pausing after ``messages``."""
    return type(
        "ReadAheadWebSocketProtocol", (ReadAheadWebSocketProtocol,), {"read_ahead": messages}
    )
