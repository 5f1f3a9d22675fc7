"""Wire messages (PROTOCOL.md "Client messages" and "Server messages"): parse and encode."""

from __future__ import annotations

import json
from typing import Any

import pytest

from transcribe_gateway.protocol import messages as m


def parse_error(frame: str | bytes) -> m.ParseError:
    with pytest.raises(m.ParseError) as info:
        m.parse_client_message(frame)
    return info.value


def update(**session: Any) -> str:
    return json.dumps(
        {"type": "session.update", "session": {"provider": "LOCAL", "model": "tiny", **session}}
    )


class TestAuth:
    def test_client_sends_auth(self) -> None:
        msg = m.parse_client_message('{"type": "auth", "token": "k-123"}')
        assert msg == m.Auth(token="k-123")

    def test_client_sends_auth_as_bytes(self) -> None:
        assert m.parse_client_message(b'{"type":"auth","token":"k"}') == m.Auth(token="k")

    @pytest.mark.parametrize(
        "frame",
        [
            '{"type": "auth"}',
            '{"type": "auth", "token": 5}',
            '{"type": "auth", "token": null}',
            '{"type": "auth", "token": "k", "extra": 1}',
        ],
    )
    def test_server_rejects_bad_auth(self, frame: str) -> None:
        assert parse_error(frame).code == "invalid_message"


class TestSessionUpdate:
    def test_client_sends_minimal_session_update(self) -> None:
        msg = m.parse_client_message(update())
        assert isinstance(msg, m.SessionUpdate)
        assert msg.session == m.SessionConfig(provider="LOCAL", model="tiny")
        # PROTOCOL.md defaults
        assert msg.session.language == "en"
        assert msg.session.input_audio_format == "pcm16"
        assert msg.session.sample_rate == 16000
        assert msg.session.prompt is None
        assert msg.session.endpointing is None
        assert msg.session.endpointing_unfinished is None

    def test_client_sends_full_session_update(self) -> None:
        msg = m.parse_client_message(
            update(
                language="multi",
                prompt="Acme, VoiceRun",
                input_audio_format="mulaw",
                sample_rate=8000,
                endpointing=300,
                endpointing_unfinished=1200,
                vad={"threshold": 0.6, "prefix_padding_ms": 200, "min_speech_ms": 50},
                fallback={"provider": "DEEPGRAM", "model": "nova-3"},
            )
        )
        assert msg == m.SessionUpdate(
            m.SessionConfig(
                provider="LOCAL",
                model="tiny",
                language="multi",
                prompt="Acme, VoiceRun",
                input_audio_format="mulaw",
                sample_rate=8000,
                endpointing=300,
                endpointing_unfinished=1200,
                vad=m.VadConfig(threshold=0.6, prefix_padding_ms=200, min_speech_ms=50),
                fallback=m.FallbackConfig(provider="DEEPGRAM", model="nova-3"),
            )
        )

    @pytest.mark.parametrize("fmt", ["pcm16", "mulaw", "alaw"])
    def test_client_sends_each_audio_format(self, fmt: str) -> None:
        msg = m.parse_client_message(update(input_audio_format=fmt))
        assert isinstance(msg, m.SessionUpdate)
        assert msg.session.input_audio_format == fmt

    @pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000])
    def test_client_sends_rate_in_range(self, rate: int) -> None:
        msg = m.parse_client_message(update(sample_rate=rate))
        assert isinstance(msg, m.SessionUpdate)
        assert msg.session.sample_rate == rate

    def test_server_rejects_unknown_session_field(self) -> None:
        err = parse_error(update(foo=1))
        assert err.code == "invalid_session_config"
        assert "foo" in err.message
        assert "session" in err.message

    @pytest.mark.parametrize(
        ("frame", "field"),
        [
            (update(foo=1), "session.foo"),
            ('{"type":"session.update","session":{"provider":"LOCAL"}}', "session.model"),
            (
                '{"type":"session.update","session":{"provider":"LOCAL","model":"m"},"extra":1}',
                "extra",
            ),
        ],
    )
    def test_server_names_unknown_or_missing_field(self, frame: str, field: str) -> None:
        err = parse_error(frame)
        assert err.code == "invalid_session_config"
        assert err.field == field
        assert field in err.message

    @pytest.mark.parametrize(
        ("session", "field"),
        [
            ({"sample_rate": "16000"}, "session.sample_rate"),
            ({"sample_rate": 16000.5}, "session.sample_rate"),
            ({"sample_rate": True}, "session.sample_rate"),
            ({"sample_rate": 7999}, "session.sample_rate"),
            ({"sample_rate": 48001}, "session.sample_rate"),
            ({"sample_rate": 0}, "session.sample_rate"),
            ({"sample_rate": -16000}, "session.sample_rate"),
            ({"input_audio_format": "flac"}, "session.input_audio_format"),
            ({"input_audio_format": "PCM16"}, "session.input_audio_format"),
            ({"input_audio_format": 1}, "session.input_audio_format"),
            ({"language": 5}, "session.language"),
            ({"prompt": ["a"]}, "session.prompt"),
            ({"provider": None}, "session.provider"),
            ({"model": 3}, "session.model"),
            ({"endpointing": 5}, "session.endpointing"),
            ({"endpointing": "500"}, "session.endpointing"),
            ({"endpointing_unfinished": 20000}, "session.endpointing_unfinished"),
            ({"vad": {"threshold": 2}}, "session.vad.threshold"),
            ({"vad": {"min_speech_ms": -1}}, "session.vad.min_speech_ms"),
            ({"vad": "on"}, "session.vad"),
            ({"fallback": {"provider": "DEEPGRAM", "model": 1}}, "session.fallback.model"),
        ],
    )
    def test_server_names_badly_typed_field(self, session: dict[str, Any], field: str) -> None:
        err = parse_error(update(**session))
        assert err.code == "invalid_session_config"
        assert err.field == field
        assert field in err.message

    def test_null_options_take_their_defaults_and_integral_floats_are_ints(self) -> None:
        # What pydantic's model_dump() and dataclasses.asdict() write for options
        # not set, and a rate computed as a float, from Python's json.
        got = m.parse_client_message(
            update(
                language=None,
                input_audio_format=None,
                sample_rate=8000.0,
                prompt=None,
                endpointing=700.0,
                vad={"threshold": None, "prefix_padding_ms": 200.0, "min_speech_ms": None},
                fallback=None,
            )
        )
        assert isinstance(got, m.SessionUpdate)
        assert got.session == m.SessionConfig(
            provider="LOCAL",
            model="tiny",
            sample_rate=8000,
            endpointing=700,
            vad=m.VadConfig(prefix_padding_ms=200),
        )
        assert type(got.session.sample_rate) is int

    @pytest.mark.parametrize(
        ("session", "field"),
        [
            ({"language": None, "sample_rate": "16000"}, "session.sample_rate"),
            (
                {"sample_rate": None, "fallback": {"provider": None, "model": "x"}},
                "session.fallback.provider",
            ),
            ({"prompt": None, "colour": None}, "session.colour"),
            ({"endpointing": 5.0}, "session.endpointing"),
        ],
    )
    def test_a_relaxed_update_names_what_is_still_wrong(
        self, session: dict[str, Any], field: str
    ) -> None:
        err = parse_error(update(**session))
        assert (err.code, err.field) == ("invalid_session_config", field), err.message

    @pytest.mark.parametrize(
        "frame",
        [
            '{"type": "session.update"}',
            '{"type": "session.update", "session": null}',
            '{"type": "session.update", "session": "LOCAL"}',
            '{"type": "session.update", "session": {}}',
        ],
    )
    def test_server_rejects_missing_session(self, frame: str) -> None:
        assert parse_error(frame).code == "invalid_session_config"


class TestAudioAppend:
    def test_client_sends_audio_append(self) -> None:
        msg = m.parse_client_message('{"type": "audio.append", "audio": "AAEC"}')
        assert msg == m.AudioAppend(audio=b"\x00\x01\x02")

    @pytest.mark.parametrize("audio", ["!!", "AAA", "QUJD=", "AA AA", "AAAA\\n", "AA-_", "A==="])
    def test_parser_decodes_base64_strictly(self, audio: str) -> None:
        err = parse_error('{"type": "audio.append", "audio": "' + audio + '"}')
        assert (err.code, err.field) == ("invalid_audio", "audio")
        assert err.message == "audio is not valid base64; chunk dropped"

    def test_audio_is_written_as_base64(self) -> None:
        assert json.loads(m.encode(m.AudioAppend(audio=b"\x00\x01\x02")))["audio"] == "AAEC"

    @pytest.mark.parametrize("audio", ["5", "null", "[1, 2]", '{"b64": "AAAA"}', "true"])
    def test_server_rejects_non_string_audio(self, audio: str) -> None:
        err = parse_error('{"type": "audio.append", "audio": ' + audio + "}")
        assert err.code == "invalid_audio"
        assert err.field == "audio"
        # In the wire's words, not the decoder's ("Expected `bytes`, got `int`").
        assert err.message == "audio must be a base64 string; chunk dropped"

    @pytest.mark.parametrize(
        "frame",
        ['{"type": "audio.append"}', '{"type": "audio.append", "audio": "AAAA", "x": 1}'],
    )
    def test_server_rejects_malformed_audio_append(self, frame: str) -> None:
        assert parse_error(frame).code == "invalid_audio"


class TestSessionClose:
    def test_client_sends_session_close(self) -> None:
        assert m.parse_client_message('{"type": "session.close"}') == m.SessionClose()

    def test_server_rejects_session_close_with_fields(self) -> None:
        assert parse_error('{"type": "session.close", "now": true}').code == "invalid_message"


class TestFraming:
    @pytest.mark.parametrize(
        "frame",
        ["", "{", "not json", '{"type": "auth", "token": "k"', "{'type': 'auth'}", b"\xff\xfe"],
    )
    def test_server_rejects_malformed_json(self, frame: str | bytes) -> None:
        err = parse_error(frame)
        assert err.code == "invalid_message"

    @pytest.mark.parametrize("frame", ["[]", "null", '"auth"', "42", "true", '[{"type":"auth"}]'])
    def test_server_rejects_non_object(self, frame: str) -> None:
        assert parse_error(frame).code == "invalid_message"

    @pytest.mark.parametrize(
        "frame",
        [
            "{}",
            '{"token": "k"}',
            '{"type": null}',
            '{"type": 5}',
            '{"type": "nope"}',
            '{"type": "Auth", "token": "k"}',
            '{"type": "session.created", "session": {"id": "ts_000000000000"}}',
        ],
    )
    def test_server_rejects_missing_or_unknown_type(self, frame: str) -> None:
        err = parse_error(frame)
        assert err.code == "invalid_message"
        assert err.field == "type"
        for kind in m.CLIENT_TYPES:
            assert kind in err.message
        assert "None" not in err.message  # a missing type is not "unknown type None"


# --------------------------------------------------------------- server side

SESSION = m.SessionInfo("ts_0123456789ab")
EFFECTIVE = m.EffectiveConfig(
    provider="LOCAL",
    model="whisper-tiny.en",
    language="en",
    input_audio_format="pcm16",
    sample_rate=16000,
    endpointing=500,
)


def wire(message: m.ServerMessage) -> dict[str, Any]:
    text = m.encode(message)
    assert isinstance(text, str)
    data: dict[str, Any] = json.loads(text)
    return data


class TestServerMessages:
    def test_server_encodes_session_created(self) -> None:
        assert wire(m.SessionCreated(SESSION)) == {
            "type": "session.created",
            "session": {"id": "ts_0123456789ab"},
        }

    def test_server_encodes_session_updated_without_unset_options(self) -> None:
        assert wire(m.SessionUpdated(EFFECTIVE)) == {
            "type": "session.updated",
            "session": {
                "provider": "LOCAL",
                "model": "whisper-tiny.en",
                "language": "en",
                "input_audio_format": "pcm16",
                "sample_rate": 16000,
                "endpointing": 500,
            },
        }

    def test_server_encodes_session_updated_with_substitution(self) -> None:
        effective = m.EffectiveConfig(
            provider="LOCAL",
            model="whisper-tiny.en",
            language="en",
            input_audio_format="mulaw",
            sample_rate=8000,
            endpointing=300,
            prompt="Acme",
            vad=m.VadConfig(threshold=0.6),
            fallback=m.FallbackConfig("OPENAI", "gpt-4o-transcribe"),
            requested_provider="DEEPGRAM",
            requested_model="nova-3",
            notice="DEEPGRAM is not configured; LOCAL serves this session",
            unsupported=["prompt"],
        )
        session = wire(m.SessionUpdated(effective))["session"]
        assert session["vad"] == {"threshold": 0.6}
        assert session["fallback"] == {"provider": "OPENAI", "model": "gpt-4o-transcribe"}
        assert session["requested_provider"] == "DEEPGRAM"
        assert session["requested_model"] == "nova-3"
        assert session["unsupported"] == ["prompt"]
        assert session["notice"].startswith("DEEPGRAM")

    def test_server_encodes_speech_started_and_stopped(self) -> None:
        assert wire(m.SpeechStarted("u1", 320)) == {
            "type": "speech.started",
            "utterance_id": "u1",
            "audio_start_ms": 320,
        }
        assert wire(m.SpeechStopped("u1", 2400)) == {
            "type": "speech.stopped",
            "utterance_id": "u1",
            "audio_end_ms": 2400,
        }

    def test_server_encodes_partial(self) -> None:
        assert wire(m.TranscriptionPartial("u1", "hello")) == {
            "type": "transcription.partial",
            "utterance_id": "u1",
            "text": "hello",
        }

    def test_server_encodes_completed_with_words(self) -> None:
        msg = m.TranscriptionCompleted(
            "u1",
            "hello world",
            100,
            900,
            [m.Word("hello", 100, 400, 0.9), m.Word("world", 450, 900)],
        )
        assert wire(msg) == {
            "type": "transcription.completed",
            "utterance_id": "u1",
            "text": "hello world",
            "start_ms": 100,
            "end_ms": 900,
            "words": [
                {"word": "hello", "start_ms": 100, "end_ms": 400, "confidence": 0.9},
                {"word": "world", "start_ms": 450, "end_ms": 900},
            ],
        }

    def test_server_encodes_completed_without_words_as_an_empty_list(self) -> None:
        # A client iterates msg.words without a check (it was left out).
        data = wire(m.TranscriptionCompleted("u1", "", 0, 0))
        assert data == {
            "type": "transcription.completed",
            "utterance_id": "u1",
            "text": "",
            "start_ms": 0,
            "end_ms": 0,
            "words": [],
        }

    def test_server_encodes_error(self) -> None:
        # retryable is always there, as docs/protocol.md shows it; field only when set.
        assert wire(m.Error(m.ErrorInfo("invalid_audio", "bad base64"))) == {
            "type": "error",
            "error": {"code": "invalid_audio", "message": "bad base64", "retryable": False},
        }

    def test_server_encodes_error_with_field_and_retryable(self) -> None:
        msg = m.Error(m.ErrorInfo("provider_error", "down", "session.provider", True))
        assert wire(msg) == {
            "type": "error",
            "error": {
                "code": "provider_error",
                "message": "down",
                "field": "session.provider",
                "retryable": True,
            },
        }

    def test_server_encodes_session_closed(self) -> None:
        data = wire(m.SessionClosed(SESSION, m.Usage(12.345), "client_close"))
        assert data == {
            "type": "session.closed",
            "session": {"id": "ts_0123456789ab"},
            "usage": {"audio_seconds": 12.345},
            "reason": "client_close",
        }

    def test_server_puts_type_first(self) -> None:
        assert m.encode(m.SessionCreated(SESSION)).startswith('{"type":"session.created"')


ALL_SERVER_MESSAGES: list[m.ServerMessage] = [
    m.SessionCreated(SESSION),
    m.SessionUpdated(EFFECTIVE),
    m.SessionUpdated(
        m.EffectiveConfig(
            "LOCAL",
            "m",
            "fr",
            "alaw",
            8000,
            10,
            "p",
            m.VadConfig(0.5, 0, 0),
            None,
            "X",
            "y",
            endpointing_unfinished=1500,
        )
    ),
    m.SpeechStarted("u1", 0),
    m.SpeechStopped("u1", 10),
    m.TranscriptionPartial("u1", "h\u00e9llo \U0001f600"),
    m.TranscriptionCompleted("u1", "hi", 0, 10, [m.Word("hi", 0, 10, 0.5)]),
    m.TranscriptionCompleted("u2", "", 5, 5),
    m.Error(m.ErrorInfo("invalid_audio", "x")),
    m.Error(m.ErrorInfo("provider_error", "x", "session.model", True)),
    m.SessionClosed(SESSION, m.Usage(0.0), "idle"),
]


class TestRoundTrip:
    @pytest.mark.parametrize("message", ALL_SERVER_MESSAGES, ids=lambda msg: type(msg).__name__)
    def test_client_parses_what_server_encodes(self, message: m.ServerMessage) -> None:
        assert m.parse_server_message(m.encode(message)) == message

    @pytest.mark.parametrize(
        "message",
        [
            m.Auth("k"),
            m.SessionUpdate(m.SessionConfig("LOCAL", "m")),
            m.SessionUpdate(
                m.SessionConfig(
                    "DEEPGRAM",
                    "nova-3",
                    "multi",
                    "a,b",
                    "mulaw",
                    8000,
                    300,
                    m.VadConfig(threshold=0.4),
                    m.FallbackConfig("LOCAL", "tiny"),
                    endpointing_unfinished=1500,
                )
            ),
            m.AudioAppend(b"\x00\x01\x02"),
            m.SessionClose(),
        ],
        ids=lambda msg: type(msg).__name__,
    )
    def test_server_parses_what_client_encodes(self, message: m.ClientMessage) -> None:
        assert m.parse_client_message(m.encode(message)) == message
