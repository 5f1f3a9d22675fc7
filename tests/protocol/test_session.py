"""The sans-I/O session (PROTOCOL.md "Connection and authentication", "Client messages",
"Lifecycle rules", "Close codes"): build a Session, feed frames, compare lists."""

from __future__ import annotations

import base64
import json
import re
import secrets
from typing import Any

import pytest

from transcribe_gateway.protocol import messages as m
from transcribe_gateway.protocol.session import (
    NORMAL,
    POLICY,
    UNAUTHORIZED,
    AudioReceived,
    Authenticate,
    CloseRequested,
    Configure,
    InvalidState,
    Session,
    State,
)

SESSION_ID = re.compile(r"^ts_[0-9a-f]{12}$")
CLOSE = '{"type": "session.close"}'
UPDATE = json.dumps({"type": "session.update", "session": {"provider": "LOCAL", "model": "tiny"}})


def new_id() -> str:
    """Built like the server builds it."""
    return "ts_" + secrets.token_hex(6)


def effective(fmt: str = "pcm16", rate: int = 16000) -> m.EffectiveConfig:
    return m.EffectiveConfig(
        provider="LOCAL",
        model="tiny",
        language="en",
        input_audio_format=fmt,
        sample_rate=rate,
        endpointing=500,
    )


def append(data: bytes) -> str:
    return json.dumps({"type": "audio.append", "audio": base64.b64encode(data).decode()})


def append_raw(audio: str) -> str:
    return json.dumps({"type": "audio.append", "audio": audio})


def sent(session: Session) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in session.data_to_send()]


def error(code: str) -> dict[str, Any]:
    """Matches an ``error`` frame by code (the message is for humans)."""
    return {"type": "error", "code": code}


def shape(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reduce error frames to type+code so lists compare simply."""
    return [
        {"type": "error", "code": f["error"]["code"]} if f["type"] == "error" else f for f in frames
    ]


def authenticated(**limits: int) -> Session:
    session = Session(new_id(), authenticated=True, **limits)
    session.data_to_send()
    return session


def streaming(fmt: str = "pcm16", **limits: int) -> Session:
    session = authenticated(**limits)
    session.receive_text(UPDATE)
    assert [type(e) for e in session.events_received()] == [Configure]
    session.accept_config(effective(fmt))
    session.data_to_send()
    return session


def assert_accepts(session: Session, data: bytes) -> None:
    session.receive_text(append(data))
    assert session.events_received() == [AudioReceived(data)]
    assert session.data_to_send() == []


def assert_rejects(session: Session, frame: str, code: str) -> None:
    state = session.state
    session.receive_text(frame)
    assert session.events_received() == []
    assert shape(sent(session)) == [error(code)]
    assert session.state is state
    assert session.close_code is None


# ------------------------------------------------------------------ auth


class TestHeaderAuth:
    def test_server_sends_session_created_at_construction(self) -> None:
        sid = new_id()
        session = Session(sid, authenticated=True)
        assert session.state is State.AWAITING_CONFIG
        assert sent(session) == [{"type": "session.created", "session": {"id": sid}}]
        assert session.events_received() == []
        assert session.close_code is None

    def test_server_sends_session_created_once(self) -> None:
        session = Session(new_id(), authenticated=True)
        assert len(session.data_to_send()) == 1
        assert session.data_to_send() == []

    def test_server_rejects_auth_message_after_header_auth(self) -> None:
        session = authenticated()
        assert_rejects(session, '{"type": "auth", "token": "k"}', "invalid_message")
        assert session.state is State.AWAITING_CONFIG


class TestMessageAuth:
    def test_server_waits_silently_for_auth(self) -> None:
        session = Session(new_id(), authenticated=False)
        assert session.state is State.AWAITING_AUTH
        assert session.data_to_send() == []
        assert session.events_received() == []
        assert session.close_code is None

    def test_client_sends_auth_first(self) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_text('{"type": "auth", "token": "secret-1"}')
        assert session.events_received() == [Authenticate("secret-1")]
        # Nothing is sent before the server has checked the token.
        assert session.data_to_send() == []
        assert session.state is State.AWAITING_AUTH

    def test_server_accepts_auth(self) -> None:
        sid = new_id()
        session = Session(sid, authenticated=False)
        session.receive_text('{"type": "auth", "token": "k"}')
        session.events_received()
        session.accept_auth()
        frames = sent(session)
        assert frames == [{"type": "session.created", "session": {"id": sid}}]
        assert SESSION_ID.match(frames[0]["session"]["id"])
        assert session.state is State.AWAITING_CONFIG

    def test_server_rejects_auth_with_4001(self) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_text('{"type": "auth", "token": "wrong"}')
        session.events_received()
        session.reject_auth()
        assert session.close_code == UNAUTHORIZED == 4001
        assert session.close_reason == "Unauthorized"
        assert session.state is State.CLOSED
        assert session.data_to_send() == []

    @pytest.mark.parametrize(
        "frame",
        [
            UPDATE,
            append(b"\x00\x00"),
            CLOSE,
            "not json",
            "",
            "{",
            "[]",
            "{}",
            '{"type": "nope"}',
            '{"type": "auth"}',
            '{"type": "auth", "token": 1}',
            '{"type": "auth", "token": "k", "extra": 1}',
        ],
    )
    def test_server_closes_4001_on_anything_but_auth_first(self, frame: str) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_text(frame)
        assert session.close_code == UNAUTHORIZED
        assert session.state is State.CLOSED
        assert session.events_received() == []
        assert session.data_to_send() == []

    @pytest.mark.parametrize("data", [b"", b"\x00\x01", b'{"type": "auth", "token": "k"}'])
    def test_server_closes_4001_on_binary_frame_first(self, data: bytes) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_bytes(data)
        assert session.close_code == UNAUTHORIZED
        assert session.events_received() == []
        assert session.data_to_send() == []

    def test_server_ignores_frames_after_4001(self) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_text(UPDATE)
        session.receive_text('{"type": "auth", "token": "k"}')
        session.receive_bytes(b"x")
        assert session.close_code == UNAUTHORIZED
        assert session.events_received() == []
        assert session.data_to_send() == []

    def test_server_rejects_second_auth_message(self) -> None:
        session = Session(new_id(), authenticated=False)
        session.receive_text('{"type": "auth", "token": "k"}')
        session.events_received()
        session.accept_auth()
        session.data_to_send()
        assert_rejects(session, '{"type": "auth", "token": "k"}', "invalid_message")
        # ...and the session goes on.
        session.receive_text(UPDATE)
        assert [type(e) for e in session.events_received()] == [Configure]

    def test_server_refuses_accept_auth_twice(self) -> None:
        session = authenticated()
        with pytest.raises(InvalidState):
            session.accept_auth()


# ------------------------------------------------------------ session.update


class TestSessionUpdate:
    def test_client_sends_session_update(self) -> None:
        session = authenticated()
        session.receive_text(UPDATE)
        assert session.events_received() == [
            Configure(m.SessionConfig(provider="LOCAL", model="tiny"))
        ]
        # The reply waits for the server to apply the configuration.
        assert session.data_to_send() == []
        assert session.state is State.AWAITING_CONFIG

    def test_server_sends_session_updated(self) -> None:
        session = authenticated()
        session.receive_text(UPDATE)
        session.events_received()
        session.accept_config(effective("mulaw", 8000))
        assert sent(session) == [
            {
                "type": "session.updated",
                "session": {
                    "provider": "LOCAL",
                    "model": "tiny",
                    "language": "en",
                    "input_audio_format": "mulaw",
                    "sample_rate": 8000,
                    "endpointing": 500,
                },
            }
        ]
        assert session.state is State.STREAMING
        assert session.audio_format == "mulaw"

    def test_server_names_bad_field_and_stays_open(self) -> None:
        session = streaming()
        frame = json.dumps(
            {
                "type": "session.update",
                "session": {"provider": "LOCAL", "model": "tiny", "sample_rate": "16000"},
            }
        )
        session.receive_text(frame)
        assert session.events_received() == []
        [err] = sent(session)
        assert err["type"] == "error"
        assert err["error"]["code"] == "invalid_session_config"
        assert err["error"]["field"] == "session.sample_rate"
        assert "session.sample_rate" in err["error"]["message"]
        assert session.state is State.STREAMING
        assert session.close_code is None
        # The previous configuration stands.
        assert_accepts(session, b"\x01\x02")

    def test_server_names_unknown_field(self) -> None:
        session = streaming()
        frame = json.dumps(
            {"type": "session.update", "session": {"provider": "LOCAL", "model": "t", "foo": 1}}
        )
        session.receive_text(frame)
        [err] = sent(session)
        assert err["error"]["code"] == "invalid_session_config"
        assert "foo" in err["error"]["message"]

    def test_client_reconfigures_while_streaming(self) -> None:
        session = streaming("pcm16")
        session.receive_text(UPDATE)
        assert [type(e) for e in session.events_received()] == [Configure]
        session.accept_config(effective("mulaw", 8000))
        [updated] = sent(session)
        assert updated["type"] == "session.updated"
        assert updated["session"]["input_audio_format"] == "mulaw"
        assert session.state is State.STREAMING
        # The new format applies: an odd-length chunk is now fine.
        assert_accepts(session, b"\x01\x02\x03")

    def test_server_keeps_format_when_reconfiguration_is_refused(self) -> None:
        session = streaming("mulaw")
        session.receive_text(UPDATE)
        session.events_received()
        session.send_error("invalid_session_config", "unknown model", field="session.model")
        assert shape(sent(session)) == [error("invalid_session_config")]
        assert_accepts(session, b"\x01\x02\x03")


# -------------------------------------------------------------- audio.append


class TestAudioAppend:
    def test_server_refuses_audio_before_config(self) -> None:
        session = authenticated()
        assert_rejects(session, append(b"\x00\x00"), "session_not_configured")
        assert session.state is State.AWAITING_CONFIG

    @pytest.mark.parametrize("fmt", ["pcm16", "mulaw", "alaw"])
    def test_client_sends_audio(self, fmt: str) -> None:
        session = streaming(fmt)
        data = bytes(range(256)) * 2 + b"\x00\x80"
        assert_accepts(session, data)

    def test_client_sends_audio_in_order(self) -> None:
        session = streaming()
        chunks = [bytes([i]) * 640 for i in range(5)]
        for chunk in chunks:
            session.receive_text(append(chunk))
        assert session.events_received() == [AudioReceived(c) for c in chunks]
        assert session.data_to_send() == []

    @pytest.mark.parametrize(
        "audio",
        [
            "AAA",  # bad padding
            "AAAAA",
            "AA=A",
            "=AAA",
            "AAAA====",
            "AA==AA==",  # data after padding
            "AA AA",
            "AAAA\n",
            "AA-_",  # URL-safe alphabet
            "!!!!",
            "AAA\u00e9",  # non-ASCII
            "\U0001f600AAA",
            "\x00AAA",
        ],
    )
    def test_server_rejects_bad_base64(self, audio: str) -> None:
        session = streaming()
        assert_rejects(session, append_raw(audio), "invalid_audio")
        assert_accepts(session, b"\x01\x02")

    @pytest.mark.parametrize("fmt", ["pcm16", "mulaw", "alaw"])
    def test_server_rejects_empty_chunk(self, fmt: str) -> None:
        session = streaming(fmt)
        assert_rejects(session, append_raw(""), "invalid_audio")
        assert_accepts(session, b"\x01\x02")

    @pytest.mark.parametrize("size", [1, 3, 641, 1279])
    def test_server_rejects_odd_pcm16_chunk(self, size: int) -> None:
        session = streaming("pcm16")
        assert_rejects(session, append(b"\x01" * size), "invalid_audio")
        assert_accepts(session, b"\x01" * (size + 1))

    @pytest.mark.parametrize("fmt", ["mulaw", "alaw"])
    @pytest.mark.parametrize("size", [1, 3, 161])
    def test_client_sends_odd_g711_chunk(self, fmt: str, size: int) -> None:
        session = streaming(fmt)
        assert_accepts(session, b"\xff" * size)

    @pytest.mark.parametrize("audio", ["5", "null", "[]"])
    def test_server_rejects_non_string_audio(self, audio: str) -> None:
        session = streaming()
        assert_rejects(session, '{"type": "audio.append", "audio": ' + audio + "}", "invalid_audio")
        assert_accepts(session, b"\x01\x02")


LIMIT = 64


def _limit_cases() -> list[tuple[str, int, str | None]]:
    cases: list[tuple[str, int, str | None]] = []
    for fmt in ("pcm16", "mulaw"):
        for size in [*range(0, 5), *range(LIMIT - 4, LIMIT + 2), LIMIT + 3, 2 * LIMIT, 100 * LIMIT]:
            if size == 0:
                expected: str | None = "invalid_audio"
            elif size > LIMIT:
                expected = "audio_too_large"
            elif fmt == "pcm16" and size % 2:
                expected = "invalid_audio"
            else:
                expected = None
            cases.append((fmt, size, expected))
    return cases


class TestChunkSizeLimit:
    @pytest.mark.parametrize(("fmt", "size", "expected"), _limit_cases())
    def test_server_checks_chunk_size(self, fmt: str, size: int, expected: str | None) -> None:
        session = streaming(fmt, max_chunk_bytes=LIMIT)
        data = bytes(i % 251 for i in range(size))
        if expected is None:
            assert_accepts(session, data)
        else:
            assert_rejects(session, append(data), expected)
            assert_accepts(session, b"\x01\x02")

    def test_server_accepts_default_limit_exactly(self) -> None:
        session = streaming()
        assert_accepts(session, b"\x00" * session.max_chunk_bytes)

    @pytest.mark.parametrize("extra", [1, 2, 3, 4, 1000])
    def test_server_rejects_default_limit_plus(self, extra: int) -> None:
        session = streaming()
        frame = append(b"\x00" * (session.max_chunk_bytes + extra))
        assert len(frame) < session.max_message_bytes
        assert_rejects(session, frame, "audio_too_large")
        assert_accepts(session, b"\x01\x02")

    def test_server_rejects_unpadded_base64_just_over_limit(self) -> None:
        # 88 base64 characters without padding decode to 66 bytes: within the
        # base64 length allowed for 64 bytes, but over the decoded limit.
        session = streaming(max_chunk_bytes=LIMIT)
        audio = base64.b64encode(b"\x00" * 66).decode()
        assert len(audio) == 88 and not audio.endswith("=")
        assert_rejects(session, append_raw(audio), "audio_too_large")

    def test_server_rejects_oversized_base64_before_decoding(self) -> None:
        session = streaming(max_chunk_bytes=LIMIT)
        assert_rejects(session, append_raw("A" * 1000), "audio_too_large")


class TestMessageSizeLimit:
    MAX = 4096

    def frame_of(self, length: int) -> str:
        """A valid 2-byte audio.append padded with JSON whitespace to ``length`` characters."""
        frame = append(b"\x01\x02")
        frame = frame[:-1] + " " * (length - len(frame)) + "}"
        assert len(frame) == length
        return frame

    def test_server_accepts_frame_at_limit(self) -> None:
        session = streaming(max_message_bytes=self.MAX)
        session.receive_text(self.frame_of(self.MAX))
        assert session.close_code is None
        assert session.events_received() == [AudioReceived(b"\x01\x02")]
        assert session.data_to_send() == []

    @pytest.mark.parametrize("over", [1, 2, 1000, 100_000])
    def test_server_closes_1008_on_frame_over_limit(self, over: int) -> None:
        session = streaming(max_message_bytes=self.MAX)
        session.receive_text(self.frame_of(self.MAX + over))
        assert session.close_code == POLICY == 1008
        assert session.state is State.CLOSED
        assert session.events_received() == []
        assert session.data_to_send() == []
        session.receive_text(append(b"\x00\x00"))
        assert session.events_received() == []
        assert session.data_to_send() == []

    def test_server_closes_1008_before_auth(self) -> None:
        session = Session(new_id(), authenticated=False, max_message_bytes=self.MAX)
        session.receive_text(self.frame_of(self.MAX + 1))
        assert session.close_code == POLICY
        assert session.data_to_send() == []

    def test_server_counts_frame_size_in_bytes(self) -> None:
        session = streaming(max_message_bytes=self.MAX)
        config = {"provider": "LOCAL", "model": "tiny", "prompt": "\u20ac" * 2000}
        frame = json.dumps({"type": "session.update", "session": config}, ensure_ascii=False)
        assert len(frame) < self.MAX < len(frame.encode())
        session.receive_text(frame)
        assert session.close_code == POLICY

    def test_server_closes_1008_on_big_binary_frame(self) -> None:
        session = streaming(max_message_bytes=self.MAX)
        session.receive_bytes(b"\x00" * (self.MAX + 1))
        assert session.close_code == POLICY
        assert session.data_to_send() == []

    def test_server_rejects_small_binary_frame(self) -> None:
        session = streaming(max_message_bytes=self.MAX)
        session.receive_bytes(b"\x00" * 640)
        assert session.events_received() == []
        assert shape(sent(session)) == [error("invalid_message")]
        assert session.close_code is None
        assert_accepts(session, b"\x01\x02")


class TestRecoverableErrors:
    def test_server_goes_on_after_each_error(self) -> None:
        session = streaming()
        bad = [
            "not json",
            "[]",
            '{"type": "nope"}',
            '{"type": "auth", "token": "k"}',
            append_raw("@@@@"),
            append_raw(""),
            append(b"\x01"),
            '{"type": "session.update", "session": {"provider": 1}}',
        ]
        for frame in bad:
            session.receive_text(frame)
            session.receive_text(append(b"\x05\x06"))
        assert session.events_received() == [AudioReceived(b"\x05\x06")] * len(bad)
        frames = sent(session)
        assert [f["type"] for f in frames] == ["error"] * len(bad)
        assert all(set(f["error"]) >= {"code", "message"} for f in frames)
        assert all(re.fullmatch(r"[a-z_]+", f["error"]["code"]) for f in frames)
        assert session.state is State.STREAMING
        assert session.close_code is None


# ------------------------------------------------------------- session.close


class TestSessionClose:
    def test_client_sends_session_close(self) -> None:
        session = streaming()
        session.receive_text(CLOSE)
        assert session.events_received() == [CloseRequested()]
        assert session.state is State.DRAINING
        assert session.data_to_send() == []
        assert session.close_code is None

    def test_client_closes_before_config(self) -> None:
        session = authenticated()
        session.receive_text(CLOSE)
        assert session.events_received() == [CloseRequested()]
        assert session.state is State.DRAINING

    def test_server_refuses_audio_while_draining(self) -> None:
        session = streaming()
        session.receive_text(CLOSE)
        session.events_received()
        assert_rejects(session, append(b"\x00\x00"), "session_closing")
        assert_rejects(session, UPDATE, "session_closing")

    def test_server_ignores_second_session_close(self) -> None:
        session = streaming()
        session.receive_text(CLOSE)
        session.receive_text(CLOSE)
        assert session.events_received() == [CloseRequested()]
        assert session.data_to_send() == []

    def test_server_forwards_speech_events_while_draining(self) -> None:
        session = streaming()
        session.receive_text(CLOSE)
        session.send_event(m.TranscriptionCompleted("u1", "last words", 0, 500))
        session.send_event(m.SpeechStopped("u1", 500))
        assert [f["type"] for f in sent(session)] == [
            "transcription.completed",
            "speech.stopped",
        ]

    def test_server_starts_draining_on_its_own(self) -> None:
        session = streaming()
        session.start_draining("the server is shutting down")
        assert session.state is State.DRAINING
        assert session.events_received() == []
        assert_rejects(session, append(b"\x00\x00"), "session_closing")
        # The client did not close it: the errors say why, not "session.close was received".
        session.receive_text(append(b"\x00\x00"))
        (error,) = sent(session)
        assert error["error"]["message"] == "the server is shutting down; chunk dropped"

    def test_server_sends_session_closed(self) -> None:
        sid = new_id()
        session = Session(sid, authenticated=True)
        session.data_to_send()
        session.accept_config(effective())
        session.data_to_send()
        session.receive_text(CLOSE)
        session.send_closed(12.3456789, "client_close")
        assert sent(session) == [
            {
                "type": "session.closed",
                "session": {"id": sid},
                "usage": {"audio_seconds": 12.346},
                "reason": "client_close",
            }
        ]
        assert session.close_code == NORMAL == 1000
        assert session.state is State.CLOSED

    @pytest.mark.parametrize(
        ("seconds", "shown"), [(0.0, 0.0), (0.0004, 0.0), (0.02, 0.02), (2.5, 2.5), (60.0001, 60.0)]
    )
    def test_server_rounds_usage(self, seconds: float, shown: float) -> None:
        session = streaming()
        session.send_closed(seconds, "idle")
        [closed] = sent(session)
        assert closed["usage"] == {"audio_seconds": shown}

    def test_server_closes_from_streaming_without_client_close(self) -> None:
        session = streaming()
        session.send_closed(1.0, "idle")
        assert session.close_code == NORMAL
        assert [f["type"] for f in sent(session)] == ["session.closed"]


class TestAfterClose:
    def closed(self) -> Session:
        session = streaming()
        session.receive_text(CLOSE)
        session.events_received()
        session.send_closed(1.0, "client_close")
        session.data_to_send()
        return session

    def test_server_refuses_second_session_closed(self) -> None:
        session = self.closed()
        with pytest.raises(InvalidState):
            session.send_closed(1.0, "again")
        assert session.data_to_send() == []
        assert session.close_code == NORMAL

    def test_server_refuses_speech_events_after_close(self) -> None:
        session = self.closed()
        with pytest.raises(InvalidState):
            session.send_event(m.TranscriptionPartial("u1", "x"))
        assert session.data_to_send() == []

    def test_server_refuses_config_after_close(self) -> None:
        session = self.closed()
        with pytest.raises(InvalidState):
            session.accept_config(effective())

    def test_server_drops_errors_after_close(self) -> None:
        session = self.closed()
        session.send_error("provider_error", "late")
        assert session.data_to_send() == []

    def test_server_ignores_frames_after_close(self) -> None:
        session = self.closed()
        session.receive_text(append(b"\x00\x00"))
        session.receive_text("garbage")
        session.receive_bytes(b"\x00" * 10)
        assert session.events_received() == []
        assert session.data_to_send() == []
        assert session.close_code == NORMAL

    def test_server_keeps_first_close_code(self) -> None:
        session = self.closed()
        session.fail(POLICY, "late")
        assert session.close_code == NORMAL


class TestSpeechEvents:
    def test_server_refuses_speech_events_before_config(self) -> None:
        session = authenticated()
        with pytest.raises(InvalidState):
            session.send_event(m.SpeechStarted("u1", 0))

    def test_server_forwards_speech_events_in_order(self) -> None:
        session = streaming()
        events: list[m.SpeechStarted | m.TranscriptionPartial | m.TranscriptionCompleted] = [
            m.SpeechStarted("u1", 100),
            m.TranscriptionPartial("u1", "he"),
            m.TranscriptionCompleted("u1", "hello", 100, 600),
        ]
        for event in events:
            session.send_event(event)
        session.send_event(m.SpeechStopped("u1", 600))
        assert [m.parse_server_message(f) for f in session.data_to_send()] == [
            *events,
            m.SpeechStopped("u1", 600),
        ]
