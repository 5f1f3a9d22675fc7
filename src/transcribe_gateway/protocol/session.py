"""The session state machine, sans I/O.

Text frames go in through :meth:`Session.receive_text`; the caller then drains
:meth:`Session.events_received` (what the client asked for) and
:meth:`Session.data_to_send` (frames to write).  When :attr:`Session.close_code`
is set, the caller writes what is pending and closes the socket with it.  No
socket, timer or event loop here, so tests feed strings and compare lists.

States::

    AWAITING_AUTH --auth ok--> AWAITING_CONFIG --valid session.update--> STREAMING
          |                         |                                      |
          +--bad/missing key--> CLOSED (4001)   session.close --> DRAINING --> CLOSED (1000)

Recoverable mistakes (bad base64, bad config, audio before configuration) are
answered with an ``error`` frame and the state does not change.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import msgspec

from transcribe_gateway.protocol import messages as m

UNAUTHORIZED: Final = 4001
TOO_MANY: Final = 4029
NORMAL: Final = 1000
POLICY: Final = 1008
INTERNAL: Final = 1011


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    AWAITING_CONFIG = "awaiting_config"
    STREAMING = "streaming"
    DRAINING = "draining"
    CLOSED = "closed"


class InvalidState(Exception):
    """A ``send_*`` method was called in a state that does not allow it."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    token: str


@dataclass(frozen=True, slots=True)
class Configure:
    config: m.SessionConfig


@dataclass(slots=True)  # not frozen: one per chunk, and frozen __init__ costs ~3x
class AudioReceived:
    data: bytes
    """Wire-format audio (pcm16/mulaw/alaw bytes), already validated."""


@dataclass(frozen=True, slots=True)
class CloseRequested:
    pass


Event = Authenticate | Configure | AudioReceived | CloseRequested


class Session:
    """Protocol state of one connection.

    Args:
        session_id: ``ts_`` + 12 hex digits.
        authenticated: the upgrade request carried a valid key already.
        max_chunk_bytes: largest decoded audio chunk accepted.
        max_message_bytes: frames above this close the connection with 1008.
    """

    def __init__(
        self,
        session_id: str,
        *,
        authenticated: bool,
        max_chunk_bytes: int = 128 * 1024,
        max_message_bytes: int = 1024 * 1024,
    ) -> None:
        self.id = session_id
        """The session id sent in ``session.created``."""
        self.state = State.AWAITING_AUTH
        self.max_chunk_bytes = max_chunk_bytes
        self.max_message_bytes = max_message_bytes
        self.audio_format = "pcm16"
        self.close_code: int | None = None
        self.close_reason = ""
        self._events: list[Event] = []
        self._out: list[str] = []
        self._ending = "session.close was received"
        """Why the session drains, for the ``session_closing`` errors."""
        self.not_configured_gate: Callable[[], bool] | None = None
        """Whether to answer an unconfigured session's chunk with an error (None:
        always); the caller sets a clock-based one once a provider error said why."""
        self.closing_gate: Callable[[], bool] | None = None
        """The same for a chunk that comes while the session ends (None: always)."""
        if authenticated:
            self.accept_auth()

    # ------------------------------------------------------------------ input

    def receive_text(self, text: str) -> None:
        """Take one text frame from the client."""
        if self.state is State.CLOSED:
            return
        # Counted in UTF-8 bytes; audio frames are ASCII, so the common case is cheap.
        if len(text) > self.max_message_bytes or (
            not text.isascii()
            and len(text.encode("utf-8", "surrogatepass")) > self.max_message_bytes
        ):
            self.fail(POLICY, "message too big")
            return
        try:
            message = m.parse_client_message(text)
        except m.ParseError as exc:
            if self.state is State.AWAITING_AUTH:
                self.fail(UNAUTHORIZED, "Unauthorized")
            elif exc.code == "invalid_audio" and self._refuse_audio():
                pass  # no chunk is taken in this state, readable or not: that is the answer
            else:
                self.send_error(exc.code, exc.message, field=exc.field)
            return
        if self.state is State.AWAITING_AUTH:
            if isinstance(message, m.Auth):
                self._events.append(Authenticate(message.token))
            else:
                self.fail(UNAUTHORIZED, "Unauthorized")
            return
        if isinstance(message, m.AudioAppend):
            self._receive_audio(message.audio)
        elif isinstance(message, m.SessionUpdate):
            if self.state is State.DRAINING:
                self.refuse_update()
            else:
                self._events.append(Configure(message.session))
        elif isinstance(message, m.SessionClose):
            if self.state in (State.AWAITING_CONFIG, State.STREAMING):
                self.state = State.DRAINING
                self._events.append(CloseRequested())
        else:  # a second auth message
            self.send_error("invalid_message", "already authenticated")

    def receive_bytes(self, data: bytes) -> None:
        """Take one binary frame: the protocol only has JSON text frames."""
        if self.state is State.AWAITING_AUTH:
            self.fail(UNAUTHORIZED, "Unauthorized")
        elif len(data) > self.max_message_bytes:
            self.fail(POLICY, "message too big")
        else:
            self.send_error(
                "invalid_message",
                "binary frames are not part of the protocol; send audio as "
                '{"type": "audio.append", "audio": "<base64>"}',
            )

    def _refuse_audio(self) -> bool:
        """Answer an ``audio.append`` that this state does not take (True if refused)."""
        if self.state is State.AWAITING_CONFIG:
            if self.not_configured_gate is None or self.not_configured_gate():
                self.send_error(
                    "session_not_configured",
                    "send session.update before audio.append; chunk dropped",
                )
            return True
        if self.state is State.DRAINING:
            if self.closing_gate is None or self.closing_gate():
                self.send_error("session_closing", f"{self._ending}; chunk dropped")
            return True
        return False

    def _receive_audio(self, data: bytes) -> None:
        if self.state is not State.STREAMING and self._refuse_audio():
            return
        size = len(data)
        if not size:
            self.send_error("invalid_audio", "audio chunk is empty; chunk dropped")
        elif size > self.max_chunk_bytes:
            self.send_error(
                "audio_too_large",
                f"audio chunk is over the {self.max_chunk_bytes}-byte limit; chunk dropped "
                "(send 20-100 ms per audio.append)",
            )
        elif size % 2 and self.audio_format == "pcm16":
            self.send_error(
                "invalid_audio", "pcm16 audio chunk has an odd number of bytes; chunk dropped"
            )
        else:
            self._events.append(AudioReceived(data))

    def events_received(self) -> list[Event]:
        """Events parsed since the last call (in order)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str]:
        """Frames to write since the last call (in order)."""
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------ transitions

    def accept_auth(self) -> None:
        """The key is valid: send ``session.created``."""
        self._expect(State.AWAITING_AUTH)
        self.state = State.AWAITING_CONFIG
        self._send(m.SessionCreated(m.SessionInfo(self.id)))

    def reject_auth(self) -> None:
        """The key is wrong: close with 4001."""
        self.fail(UNAUTHORIZED, "Unauthorized")

    def reject_over_quota(self, message: str) -> None:
        """The key is valid but over its session limit: ``error`` then close 4029."""
        self._expect(State.AWAITING_AUTH)
        self._send(m.Error(m.ErrorInfo("too_many_sessions", message, retryable=True)))
        self.fail(TOO_MANY, "Too many sessions")

    def accept_config(self, effective: m.EffectiveConfig) -> None:
        """A ``session.update`` was applied: send ``session.updated``."""
        if self.state not in (State.AWAITING_CONFIG, State.STREAMING):
            raise InvalidState(f"cannot accept a configuration in state {self.state.value}")
        self.state = State.STREAMING
        self.audio_format = effective.input_audio_format
        self._send(m.SessionUpdated(effective))

    def announce_config(self, effective: m.EffectiveConfig) -> None:
        """The server changed what serves the session (a fallback took over)."""
        if self.state in (State.STREAMING, State.DRAINING):
            self._send(m.SessionUpdated(effective))

    def refuse_update(self) -> None:
        """A ``session.update`` comes too late: the session is ending (also one
        taken before, whose engine was still opening when the end began)."""
        self.send_error("session_closing", f"{self._ending}; no more updates")

    def start_draining(self, why: str = "the session is ending") -> None:
        """The server ends the session (idle timeout, shutdown): stop taking audio.

        ``why`` opens the ``session_closing`` errors of what is refused from now
        on (they must not say the client closed it).
        """
        if self.state in (State.AWAITING_CONFIG, State.STREAMING):
            self.state = State.DRAINING
            self._ending = why

    def send_closed(self, audio_seconds: float, reason: str) -> None:
        """Last message of a graceful end, then close 1000."""
        if self.state is State.CLOSED:
            raise InvalidState("session is already closed")
        self._send(
            m.SessionClosed(m.SessionInfo(self.id), m.Usage(round(audio_seconds, 3)), reason)
        )
        self.state = State.CLOSED
        self.close_code, self.close_reason = NORMAL, ""

    def fail(self, code: int, reason: str) -> None:
        """End the connection without ``session.closed`` (auth, abuse, internal error)."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_code, self.close_reason = code, reason

    # ----------------------------------------------------------------- output

    def send_error(
        self, code: str, message: str, *, field: str | None = None, retryable: bool = False
    ) -> None:
        if self.state is State.CLOSED:
            return
        where = msgspec.UNSET if field is None else field
        self._send(m.Error(m.ErrorInfo(code, message, where, retryable)))

    def send_event(
        self,
        event: m.SpeechStarted
        | m.SpeechStopped
        | m.TranscriptionPartial
        | m.TranscriptionCompleted,
    ) -> None:
        """Forward a speech event (only while configured and not closed)."""
        if self.state not in (State.STREAMING, State.DRAINING):
            raise InvalidState(f"cannot send {type(event).__name__} in state {self.state.value}")
        self._send(event)

    def _send(self, message: m.ServerMessage) -> None:
        self._out.append(m.encode(message))

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise InvalidState(f"expected state {state.value}, not {self.state.value}")
