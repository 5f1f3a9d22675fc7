"""The exceptions the client SDK raises, and how it reads a WebSocket close.

Close codes and reasons (whoever sent them) become :class:`TranscribeConnectionClosed`
and its subclasses; a server ``error`` becomes :class:`TranscribeError`.
"""

from __future__ import annotations

from typing import Final

from websockets.exceptions import ConnectionClosed

from transcribe_gateway.client.results import StreamResult
from transcribe_gateway.protocol.messages import ErrorInfo

__all__ = [
    "TranscribeClientError",
    "TranscribeConnectionClosed",
    "TranscribeError",
    "TranscribeQuotaExceeded",
    "TranscribeUnauthorized",
]

_CLOSE_MEANINGS: Final = {
    1000: "normal close",
    1001: "going away",
    1002: "protocol error",
    1006: "connection lost without a close frame",
    1007: "invalid data",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal server error",
    1012: "service restart",
    4001: "unauthorized",
    4029: "too many sessions or over quota",
}
_CLIENT_CLOSE_MEANINGS: Final = {1011: "internal error"}
"""Meanings that differ when the client sent the code (its keepalive gave up: 1011)."""


class TranscribeClientError(Exception):
    """Base class of the exceptions this SDK raises on purpose."""


class TranscribeError(TranscribeClientError):
    """The server answered with an ``error`` message.

    Args:
        code: the protocol error code, e.g. ``invalid_session_config``.
        message: the server's human-readable explanation.
        field: dotted path of the offending field, when the server names one.
        retryable: whether the server says trying again may help.
    """

    def __init__(
        self, code: str, message: str, field: str | None = None, *, retryable: bool = False
    ) -> None:
        where = f" (field {field})" if field else ""
        super().__init__(f"{code}: {message}{where}")
        self.code = code
        self.message = message
        self.field = field
        self.retryable = retryable

    @classmethod
    def from_info(cls, info: ErrorInfo) -> TranscribeError:
        """Build the exception from the ``error`` object of a server message."""
        field = info.field if isinstance(info.field, str) else None
        return cls(info.code, info.message, field, retryable=info.retryable)


class TranscribeConnectionClosed(TranscribeClientError):
    """The WebSocket ended abnormally (any close code but 1000/1001).

    Use :meth:`for_code` to get the most specific subclass.

    Args:
        code: the WebSocket close code (1006 when the connection dropped).
        reason: the close reason sent by the server, possibly empty.
        error: the ``error`` the server sent to explain the close, if any
            (e.g. ``too_many_sessions`` before 4029).
        by_client: no close frame came from the server, and ``code`` and
            ``reason`` are those the client sent (1011 ``keepalive timeout...``
            when the server stopped answering; 1002/1007/1009 when the server
            sent a frame the client refused).
        before_closed: raised by :meth:`TranscribeClient.stream_samples` because
            the socket ended before ``session.closed`` (whatever the code, 1000
            and 1001 included): the transcript is incomplete.

    Attributes:
        result: when raised by :meth:`TranscribeClient.stream_samples`, what
            the stream collected before the socket ended (``closed`` None):
            the finals that came, the audio sent and the timings; else None.
    """

    def __init__(
        self,
        code: int,
        reason: str = "",
        *,
        error: ErrorInfo | None = None,
        by_client: bool = False,
        before_closed: bool = False,
    ) -> None:
        meanings = _CLIENT_CLOSE_MEANINGS if by_client else {}
        meaning = meanings.get(code) or _CLOSE_MEANINGS.get(code, "abnormal close")
        who = " sent by the client (none came from the server)" if by_client else ""
        early = " before session.closed" if before_closed else ""
        detail = f": {reason}" if reason else ""
        cause = f" after error {error.code}: {error.message}" if error is not None else ""
        super().__init__(
            f"connection closed with code {code} ({meaning}){who}{early}{detail}{cause}"
        )
        self.code = code
        self.reason = reason
        self.error = error
        self.by_client = by_client
        self.before_closed = before_closed
        self.result: StreamResult | None = None

    @staticmethod
    def for_code(
        code: int,
        reason: str = "",
        *,
        error: ErrorInfo | None = None,
        by_client: bool = False,
        before_closed: bool = False,
    ) -> TranscribeConnectionClosed:
        """Return the exception matching a close code.

        Args:
            code: the WebSocket close code.
            reason: the close reason.
            error: the ``error`` the server sent before closing, if any.
            by_client: the client sent the code and none came from the server.
            before_closed: the socket ended before ``session.closed``.

        Returns:
            :class:`TranscribeUnauthorized` for 4001,
            :class:`TranscribeQuotaExceeded` for 4029, else the base class.
        """
        cls: type[TranscribeConnectionClosed] = TranscribeConnectionClosed
        if code == 4001:
            cls = TranscribeUnauthorized
        elif code == 4029:
            cls = TranscribeQuotaExceeded
        return cls(code, reason, error=error, by_client=by_client, before_closed=before_closed)


class TranscribeUnauthorized(TranscribeConnectionClosed):
    """The key or token was refused (close 4001, or HTTP 401/403 on the upgrade).

    When the server explained it (``error`` ``forbidden`` or ``unauthorized``
    before the close, at the start or mid-stream: a revoked key),
    :attr:`error` holds that error's code and message.
    """


class TranscribeQuotaExceeded(TranscribeConnectionClosed):
    """Too many concurrent sessions or over quota (close 4029, or HTTP 429).

    :attr:`error` holds the server's ``too_many_sessions`` or
    ``quota_exceeded`` error (code and message) when it sent one, at the start
    or mid-stream.
    """


def _close_of(exc: ConnectionClosed) -> tuple[int, str, bool]:
    """Close code and reason, and whether the client sent them.

    The server's when it sent a close frame; else the client's own when it had
    sent one (its keepalive gave up: 1011, or it refused a frame: 1002, 1007,
    1009...); else 1006 (the connection was lost).
    """
    if exc.rcvd is not None:
        return int(exc.rcvd.code), exc.rcvd.reason, False
    if exc.sent is not None:
        return int(exc.sent.code), exc.sent.reason, True
    return 1006, "", False
