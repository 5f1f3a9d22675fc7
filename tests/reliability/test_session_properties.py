"""Property tests of the sans-I/O ``Session``: every message in every state, chunk limits,
base64 edge cases, and a stateful search over long hostile conversations.

Invariants: input never raises; every bad input gets an ``error`` with a
documented code or closes with a documented code; the state machine moves only
along the edges drawn in protocol/session.py; nothing is sent after the close.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.reliability import wire
from transcribe_gateway.protocol import messages as m
from transcribe_gateway.protocol.session import (
    INTERNAL,
    NORMAL,
    POLICY,
    UNAUTHORIZED,
    AudioReceived,
    Authenticate,
    CloseRequested,
    Configure,
    Event,
    Session,
    State,
)

A, C, S, D, X = (
    State.AWAITING_AUTH,
    State.AWAITING_CONFIG,
    State.STREAMING,
    State.DRAINING,
    State.CLOSED,
)
EDGES: Final = {
    A: {A, C, X},
    C: {C, S, D, X},
    S: {S, D, X},
    D: {D, X},
    X: {X},
}
"""Allowed state changes (the diagram in protocol/session.py)."""

CHUNK: Final = 640
MESSAGE: Final = 4096


def effective(fmt: str = "pcm16") -> m.EffectiveConfig:
    return m.EffectiveConfig("LOCAL", "tiny", "en", fmt, 16000, 500)


def new_session(*, authenticated: bool = True) -> Session:
    return Session(
        "ts_000000000000",
        authenticated=authenticated,
        max_chunk_bytes=CHUNK,
        max_message_bytes=MESSAGE,
    )


def session_in(state: State) -> Session:
    """A session driven into ``state`` the way the server drives it."""
    session = new_session(authenticated=state is not A)
    if state in (S, D):
        session.accept_config(effective())
    if state is D:
        session.receive_text('{"type": "session.close"}')
    if state is X:
        session.send_closed(0.0, "client_close")
    session.events_received()
    session.data_to_send()
    assert session.state is state
    return session


def append(data: bytes) -> str:
    return json.dumps({"type": "audio.append", "audio": base64.b64encode(data).decode()})


INPUTS: Final[dict[str, str | bytes]] = {
    "auth": json.dumps({"type": "auth", "token": wire.GOOD_KEY}),
    "update": json.dumps({"type": "session.update", "session": {"provider": "P", "model": "M"}}),
    "audio": append(bytes(CHUNK)),
    "close": '{"type": "session.close"}',
    "bad_json": "{nope",
    "bad_update": json.dumps({"type": "session.update", "session": {"provider": 1}}),
    "bad_audio": json.dumps({"type": "audio.append", "audio": "!!"}),
    "too_big": "x" * (MESSAGE + 1),
    "binary": bytes(10),
    "binary_too_big": bytes(MESSAGE + 1),
}

# state -> input -> (event type or None, error code or None, close code or None, new state)
TABLE: Final[dict[State, dict[str, tuple[type | None, str | None, int | None, State]]]] = {
    A: {
        "auth": (Authenticate, None, None, A),
        "update": (None, None, UNAUTHORIZED, X),
        "audio": (None, None, UNAUTHORIZED, X),
        "close": (None, None, UNAUTHORIZED, X),
        "bad_json": (None, None, UNAUTHORIZED, X),
        "bad_update": (None, None, UNAUTHORIZED, X),
        "bad_audio": (None, None, UNAUTHORIZED, X),
        "too_big": (None, None, POLICY, X),
        "binary": (None, None, UNAUTHORIZED, X),
        "binary_too_big": (None, None, UNAUTHORIZED, X),
    },
    C: {
        "auth": (None, "invalid_message", None, C),
        "update": (Configure, None, None, C),
        "audio": (None, "session_not_configured", None, C),
        "close": (CloseRequested, None, None, D),
        "bad_json": (None, "invalid_message", None, C),
        "bad_update": (None, "invalid_session_config", None, C),
        "bad_audio": (None, "session_not_configured", None, C),  # dropped unread
        "too_big": (None, None, POLICY, X),
        "binary": (None, "invalid_message", None, C),
        "binary_too_big": (None, None, POLICY, X),
    },
    S: {
        "auth": (None, "invalid_message", None, S),
        "update": (Configure, None, None, S),
        "audio": (AudioReceived, None, None, S),
        "close": (CloseRequested, None, None, D),
        "bad_json": (None, "invalid_message", None, S),
        "bad_update": (None, "invalid_session_config", None, S),
        "bad_audio": (None, "invalid_audio", None, S),
        "too_big": (None, None, POLICY, X),
        "binary": (None, "invalid_message", None, S),
        "binary_too_big": (None, None, POLICY, X),
    },
    D: {
        "auth": (None, "invalid_message", None, D),
        "update": (None, "session_closing", None, D),
        "audio": (None, "session_closing", None, D),
        "close": (None, None, None, D),
        "bad_json": (None, "invalid_message", None, D),
        "bad_update": (None, "invalid_session_config", None, D),
        "bad_audio": (None, "session_closing", None, D),
        "too_big": (None, None, POLICY, X),
        "binary": (None, "invalid_message", None, D),
        "binary_too_big": (None, None, POLICY, X),
    },
    X: {name: (None, None, NORMAL, X) for name in INPUTS},
}


def feed(session: Session, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        session.receive_bytes(frame)
    else:
        session.receive_text(frame)


class TestEveryMessageInEveryState:
    @pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
    @pytest.mark.parametrize("name", list(INPUTS))
    def test_session_input_in_state_has_the_documented_outcome(
        self, state: State, name: str
    ) -> None:
        event_type, code, close_code, new_state = TABLE[state][name]
        session = session_in(state)
        feed(session, INPUTS[name])
        events = session.events_received()
        out = wire.check_frames(session.data_to_send())
        assert [type(e) for e in events] == ([event_type] if event_type else [])
        errors = [o.error.code for o in out if isinstance(o, m.Error)]
        assert errors == ([code] if code else [])
        assert len(out) == len(errors)  # client input alone never produces anything else
        assert session.close_code == close_code
        assert session.state is new_state


class TestChunkSizes:
    @pytest.mark.parametrize("fmt", ["pcm16", "mulaw"])
    def test_session_every_chunk_size_from_0_to_limit_plus_1(self, fmt: str) -> None:
        session = new_session()
        session.accept_config(effective(fmt))
        session.data_to_send()
        for size in range(CHUNK + 2):
            session.receive_text(append(bytes([size % 256]) * size))
            events = session.events_received()
            out = wire.check_frames(session.data_to_send())
            if size == 0:
                expected = "invalid_audio"
            elif size > CHUNK:
                expected = "audio_too_large"
            elif fmt == "pcm16" and size % 2:
                expected = "invalid_audio"
            else:
                expected = None
            if expected is None:
                assert out == [] and len(events) == 1, size
                assert isinstance(events[0], AudioReceived) and len(events[0].data) == size
            else:
                assert events == [], size
                assert [o.error.code for o in out if isinstance(o, m.Error)] == [expected], size
            assert session.state is S

    @settings(max_examples=60, deadline=None)
    @given(st.integers(320, 64 * 1024), st.integers(-2, 2))
    def test_session_limit_boundary_for_any_limit(self, limit: int, delta: int) -> None:
        session = Session("ts_000000000000", authenticated=True, max_chunk_bytes=limit)
        session.accept_config(effective("mulaw"))
        session.data_to_send()
        size = max(1, limit + delta)
        session.receive_text(append(bytes(size)))
        events = session.events_received()
        out = wire.check_frames(session.data_to_send())
        if size <= limit:
            assert len(events) == 1 and not out
        else:
            assert not events and [o.error.code for o in out if isinstance(o, m.Error)] == [
                "audio_too_large"
            ]


class TestBase64:
    @settings(max_examples=300, deadline=None)
    @given(wire.base64_texts)
    def test_session_accepts_only_base64_and_decodes_it_exactly(self, audio: str) -> None:
        session = new_session()
        session.accept_config(effective("mulaw"))
        session.data_to_send()
        session.receive_text(json.dumps({"type": "audio.append", "audio": audio}))
        events = session.events_received()
        out = wire.check_frames(session.data_to_send())
        try:
            reference: bytes | None = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            reference = None
        if events:
            (event,) = events
            assert isinstance(event, AudioReceived)
            assert event.data == reference  # never a lenient reading of garbage
            assert not out
        else:
            (error,) = out
            assert isinstance(error, m.Error)
            assert error.error.code in ("invalid_audio", "audio_too_large")
        if reference and len(reference) <= CHUNK and audio == base64.b64encode(reference).decode():
            assert events, "canonical base64 of an acceptable chunk must be accepted"


class TestOversizedFrames:
    @settings(max_examples=30, deadline=None)
    @given(
        st.integers(MESSAGE - 2, MESSAGE + 2),
        st.sampled_from(["a", "é", "😀"]),
        st.sampled_from(list(State)),
    )
    def test_session_frame_over_the_message_limit_closes_1008(
        self, size: int, char: str, state: State
    ) -> None:
        session = session_in(state)
        text = char * (size // len(char.encode()))
        session.receive_text(text)
        wire.check_frames(session.data_to_send())
        if state is X:
            assert session.close_code == NORMAL
        elif len(text.encode()) > MESSAGE:
            assert session.close_code == POLICY and session.state is X
        else:
            assert session.close_code in (None, UNAUTHORIZED)


class HostileConversation(RuleBasedStateMachine):
    """A client sending anything, and a server answering as server/connection.py does."""

    def __init__(self) -> None:
        super().__init__()
        self.session = new_session(authenticated=False)
        self.closed_by: int | None = None
        self.previous = self.session.state

    # --------------------------------------------------------- client input

    @rule(frame=wire.frames)
    def send_text(self, frame: str) -> None:
        self._client(frame)

    @rule(doc=wire.message_dicts)
    def send_message(self, doc: dict[str, Any]) -> None:
        self._client(json.dumps(doc))

    @rule(size=st.integers(0, CHUNK + 2), fmt_odd=st.booleans())
    def send_audio(self, size: int, fmt_odd: bool) -> None:
        self._client(append(bytes(size + (1 if fmt_odd else 0))))

    @rule(name=st.sampled_from(list(INPUTS)))
    def send_known(self, name: str) -> None:
        self._client(INPUTS[name])

    @rule(data=st.binary(max_size=MESSAGE + 10))
    def send_binary(self, data: bytes) -> None:
        self._client(data)

    # --------------------------------------------------------- server side

    @precondition(lambda self: self.session.state in (S, D))
    @rule(text=st.text(max_size=30))
    def engine_final(self, text: str) -> None:
        self.session.send_event(m.TranscriptionCompleted("utt_1", text, 0, 10))
        self._check_output(self.session.data_to_send(), server_side=True)

    @rule()
    def idle_timeout(self) -> None:
        self.session.start_draining()
        self._check_output(self.session.data_to_send(), server_side=True)

    @precondition(lambda self: self.session.state is D)
    @rule()
    def drained(self) -> None:
        self.session.send_closed(1.0, "client_close")
        self._check_output(self.session.data_to_send(), server_side=True)

    @rule()
    def internal_error(self) -> None:
        was_closed = self.session.state is X
        self.session.fail(INTERNAL, "internal error")
        if not was_closed:
            self.closed_by = INTERNAL
        self._check_output(self.session.data_to_send(), server_side=True)

    # --------------------------------------------------------- invariants

    @invariant()
    def state_is_consistent(self) -> None:
        session = self.session
        assert session.state in EDGES[self.previous], (self.previous, session.state)
        self.previous = session.state
        assert (session.state is X) == (session.close_code is not None)
        assert session.events_received() == []  # the driver drained everything

    def _client(self, frame: str | bytes) -> None:
        session = self.session
        before = session.state
        code_before = session.close_code
        feed(session, frame)
        events = session.events_received()
        out = self._check_output(session.data_to_send(), server_side=False)
        if before is X:
            assert not events and not out
            assert session.close_code == code_before
            return
        if session.close_code is not None and code_before is None:
            assert session.close_code in wire.CLIENT_CLOSE_CODES
        for event in events:
            self._serve(before, event)

    def _serve(self, before: State, event: Event) -> None:
        """React to an event as the connection layer does."""
        session = self.session
        if isinstance(event, Authenticate):
            assert before is A
            if event.token == wire.GOOD_KEY:
                session.accept_auth()
            else:
                session.reject_auth()
        elif isinstance(event, Configure):
            assert before in (C, S)
            fmt = event.config.input_audio_format
            assert fmt in m.AUDIO_FORMATS
            assert m.MIN_SAMPLE_RATE <= event.config.sample_rate <= m.MAX_SAMPLE_RATE
            session.accept_config(effective(fmt))
        elif isinstance(event, AudioReceived):
            assert before is S
            assert 0 < len(event.data) <= CHUNK
            assert session.audio_format != "pcm16" or len(event.data) % 2 == 0
        else:
            assert isinstance(event, CloseRequested)
            assert before in (C, S) and session.state is D
        self._check_output(session.data_to_send(), server_side=True)

    def _check_output(self, frames: list[str], *, server_side: bool) -> list[m.ServerMessage]:
        out = wire.check_frames(frames)
        if not server_side:
            assert all(isinstance(o, m.Error) for o in out)
        return out


HostileConversation.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestHostileConversation = HostileConversation.TestCase
