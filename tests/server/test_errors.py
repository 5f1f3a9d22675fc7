"""Every error code and close code of PROTOCOL.md, each followed by proof the session goes on."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.server.wsutil import collect, connect, open_session, recv, send_audio

GOOD_CHUNK = json.dumps({"type": "audio.append", "audio": base64.b64encode(bytes(640)).decode()})


async def expect_error(ws: ClientConnection, code: str) -> dict[str, Any]:
    msg = await recv(ws, 10)
    assert msg["type"] == "error", msg
    assert msg["error"]["code"] == code, msg
    assert msg["error"]["message"]
    return msg


async def still_works(ws: ClientConnection) -> None:
    """A valid chunk is accepted silently and the session closes cleanly with usage."""
    await ws.send(GOOD_CHUNK)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    assert messages[-1]["type"] == "session.closed", messages
    assert messages[-1]["usage"]["audio_seconds"] >= 0.02
    assert not [m for m in messages if m["type"] == "error"], messages
    assert ws.close_code == 1000


class TestInvalidMessage:
    @pytest.mark.parametrize(
        "frame", ["{not json", "[1, 2]", '{"type": "bogus"}', '{"no_type": 1}', '"text"']
    )
    async def test_bad_frame_gets_invalid_message(
        self, gateway: GatewayProcess, frame: str
    ) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(frame)
        await expect_error(ws, "invalid_message")
        await still_works(ws)

    async def test_binary_frame_gets_invalid_message(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(bytes(640))
        await expect_error(ws, "invalid_message")
        await still_works(ws)


class TestInvalidSessionConfig:
    @pytest.mark.parametrize(
        ("session", "field"),
        [
            ({"provider": "NOPE", "model": "x"}, "session.provider"),
            ({"provider": "LOCAL", "model": "nope"}, "session.model"),
            (
                {
                    "provider": "LOCAL",
                    "model": "whisper-tiny.en",
                    "fallback": {"provider": "NOPE", "model": "x"},
                },
                "session.fallback.provider",
            ),
            (
                {
                    "provider": "LOCAL",
                    "model": "whisper-tiny.en",
                    "fallback": {"provider": "LOCAL", "model": "nope"},
                },
                "session.fallback.model",
            ),
            ({"provider": "DEEPGRAM", "model": "whisper-tiny.en"}, "session.model"),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": 7999},
                "session.sample_rate",
            ),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": 48001},
                "session.sample_rate",
            ),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": "16000"},
                "session.sample_rate",
            ),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "input_audio_format": "opus"},
                "session.input_audio_format",
            ),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "language": "fr"},
                "session.language",
            ),
            (  # the primary has the language, its fallback not: the fallback's fault
                {
                    "provider": "FAULTY",
                    "model": "echo",
                    "language": "de",
                    "fallback": {"provider": "LOCAL", "model": "whisper-tiny.en"},
                },
                "session.fallback.model",
            ),
            ({"provider": "LOCAL", "model": "whisper-tiny.en", "colour": "blue"}, "session.colour"),
            ({"provider": "LOCAL"}, "session.model"),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "endpointing": -5},
                "session.endpointing",
            ),
            (
                {"provider": "LOCAL", "model": "whisper-tiny.en", "vad": {"threshold": 2}},
                "session.vad.threshold",
            ),
        ],
    )
    async def test_bad_config_names_the_field_and_previous_config_stands(
        self, gateway: GatewayProcess, session: dict[str, Any], field: str
    ) -> None:
        ws, _updated = await open_session(gateway.url, sample_rate=8000)
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        err = await expect_error(ws, "invalid_session_config")
        assert err["error"].get("field") == field, err
        # The previous configuration (8 kHz) stands: 20 ms at 8 kHz = 320 bytes, 0.02 s.
        await ws.send(
            json.dumps({"type": "audio.append", "audio": base64.b64encode(bytes(320)).decode()})
        )
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(0.02)

    @pytest.mark.parametrize("where", ["provider", "model", "language"])
    async def test_a_huge_name_is_not_echoed_whole(
        self, gateway: GatewayProcess, where: str
    ) -> None:
        # 500 KB came back in the error (an amplifier); reliability.md bounds an
        # error's echo of client input at 1024 characters.
        ws, _updated = await open_session(gateway.url)
        session = {"provider": "LOCAL", "model": "whisper-tiny.en", where: "x" * 500_000}
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        err = await expect_error(ws, "invalid_session_config")
        assert err["error"]["field"] == f"session.{where}"
        assert len(err["error"]["message"]) <= 1024, len(err["error"]["message"])

    async def test_bad_first_config_leaves_session_unconfigured(
        self, gateway: GatewayProcess
    ) -> None:
        ws = await connect(gateway.url)
        await recv(ws)
        await ws.send(
            json.dumps({"type": "session.update", "session": {"provider": "X", "model": "y"}})
        )
        await expect_error(ws, "invalid_session_config")
        await ws.send(GOOD_CHUNK)
        await expect_error(ws, "session_not_configured")
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"provider": "LOCAL", "model": "whisper-tiny.en"},
                }
            )
        )
        assert (await recv(ws))["type"] == "session.updated"
        await still_works(ws)


class TestAudioErrors:
    @pytest.mark.parametrize(
        ("audio", "code"),
        [
            ("!!!notbase64!!!", "invalid_audio"),
            ("QUJD=", "invalid_audio"),  # bad padding
            ("", "invalid_audio"),  # empty chunk
            (base64.b64encode(bytes(641)).decode(), "invalid_audio"),  # odd pcm16
            (base64.b64encode(bytes(128 * 1024 + 2)).decode(), "audio_too_large"),
        ],
    )
    async def test_bad_chunk_is_dropped_with_error(
        self, gateway: GatewayProcess, audio: str, code: str
    ) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(json.dumps({"type": "audio.append", "audio": audio}))
        await expect_error(ws, code)
        await still_works(ws)

    async def test_chunk_at_the_limit_is_accepted(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(
            json.dumps(
                {"type": "audio.append", "audio": base64.b64encode(bytes(128 * 1024)).decode()}
            )
        )
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(4.096)
        assert not [m for m in messages if m["type"] == "error"]

    async def test_odd_length_is_fine_for_mulaw(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url, input_audio_format="mulaw", sample_rate=8000)
        await ws.send(
            json.dumps({"type": "audio.append", "audio": base64.b64encode(bytes(161)).decode()})
        )
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(161 / 8000, abs=1e-3)

    async def test_audio_before_configuration(self, gateway: GatewayProcess) -> None:
        ws = await connect(gateway.url)
        await recv(ws)
        await ws.send(GOOD_CHUNK)
        await expect_error(ws, "session_not_configured")
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"provider": "LOCAL", "model": "whisper-tiny.en"},
                }
            )
        )
        assert (await recv(ws))["type"] == "session.updated"
        await still_works(ws)


class TestProviderErrors:
    async def test_missing_local_model_gets_provider_unavailable(
        self, gateway: GatewayProcess
    ) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"provider": "LOCAL", "model": "whisper-base.en"},
                }
            )
        )
        err = await expect_error(ws, "provider_unavailable")
        assert "whisper-base.en" in err["error"]["message"]
        assert "whisper_models" in err["error"]["message"]  # says what to set
        await still_works(ws)

    async def test_provider_failure_mid_stream_gets_provider_error_and_session_stays(
        self, gateway: GatewayProcess
    ) -> None:
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="fail-after-audio")
        await send_audio(ws, np.zeros(16000, dtype=np.int16))
        err = await expect_error(ws, "provider_error")
        assert "FAULTY" in err["error"]["message"]
        # Audio without an engine is reported (not silently dropped), as audio the
        # session cannot take: the failure itself was the provider_error ...
        await ws.send(GOOD_CHUNK)
        await expect_error(ws, "session_not_configured")
        # ... and a new session.update brings the session back.
        await ws.send(
            json.dumps(
                {"type": "session.update", "session": {"provider": "FAULTY", "model": "echo"}}
            )
        )
        assert (await recv(ws))["type"] == "session.updated"
        await send_audio(ws, np.zeros(8000, dtype=np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert [m["text"] for m in messages if m["type"] == "transcription.completed"] == [
            "chunk 0"
        ]
        assert messages[-1]["type"] == "session.closed"

    async def test_audio_after_a_first_engine_that_failed_to_open_gets_one_error_a_second(
        self, gateway: GatewayProcess
    ) -> None:
        # A real-time client streams right after its session.update; the engine
        # refuses to open, and every chunk held meanwhile got its own error.
        ws = await connect(gateway.url)
        await recv(ws)  # session.created
        update = {"provider": "FAULTY", "model": "refuse-on-open"}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await send_audio(ws, np.zeros(16000 * 2, dtype=np.int16))  # 100 chunks, at once
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
        assert codes[0] == "provider_error", codes
        assert 1 <= codes.count("session_not_configured") <= 2, codes
        assert messages[-1]["type"] == "session.closed"

    async def test_audio_after_session_close_gets_one_error_a_second(
        self, gateway: GatewayProcess
    ) -> None:
        # A real-time client that goes on streaming while its session finishes
        # got one session_closing per chunk (50 a second, as long as the drain).
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="count-slow-finalize")
        await send_audio(ws, np.zeros(1600, dtype=np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        await send_audio(ws, np.zeros(16000, dtype=np.int16), realtime=1.0)  # in the 2 s drain
        messages = await collect(ws, 30)
        codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
        assert 1 <= codes.count("session_closing") <= 2, codes
        assert messages[-1]["type"] == "session.closed"

    async def test_audio_dropped_after_a_failure_is_not_billed_but_keeps_the_clock(
        self, gateway: GatewayProcess
    ) -> None:
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="fail-after-audio")
        await send_audio(ws, np.zeros(8000, dtype=np.int16))  # 0.5 s: all taken, then it fails
        await expect_error(ws, "provider_error")
        await send_audio(ws, np.zeros(32000, dtype=np.int16))  # 2 s that no engine takes
        await ws.send(
            json.dumps(
                {"type": "session.update", "session": {"provider": "FAULTY", "model": "echo"}}
            )
        )
        dropped = []
        while (msg := await recv(ws))["type"] != "session.updated":
            dropped.append(msg["error"]["code"])
        assert set(dropped) == {"session_not_configured"}, dropped
        await send_audio(ws, np.zeros(8000, dtype=np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        # The client was told those 2 s were dropped: they are not in its usage
        # (nor its quota), but they are on its timeline.
        final = next(m for m in messages if m["type"] == "transcription.completed")
        assert (final["text"], final["start_ms"]) == ("chunk 0", 2500)
        assert messages[-1]["usage"]["audio_seconds"] == 1.0, messages[-1]

    async def test_finalize_that_never_returns_is_bounded(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="hang-on-finalize")
        await send_audio(ws, np.zeros(8000, dtype=np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 20)  # the server drain timeout is 5 s
        kinds = [m["type"] for m in messages]
        assert "transcription.completed" in kinds
        assert messages[-2]["type"] == "error" and messages[-2]["error"]["code"] == "provider_error"
        assert kinds[-1] == "session.closed"
        assert ws.close_code == 1000

    async def test_engine_bug_closes_1011_and_server_goes_on(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"provider": "FAULTY", "model": "crash-on-open"},
                }
            )
        )
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await recv(ws, 10)
        assert ws.close_code == 1011
        ws2, _ = await open_session(gateway.url)
        await still_works(ws2)


class TestCloseCodes:
    async def test_frame_far_over_the_limit_closes_1008(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.send(json.dumps({"type": "audio.append", "audio": "A" * (2 * 1024 * 1024)}))
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 10)
        assert ws.close_code == 1008

    async def test_close_completes_while_unread_messages_wait(
        self, gateway: GatewayProcess
    ) -> None:
        # The session ends with unread messages queued behind the one that ends it:
        # the server must still read the client's close reply rather than leave the
        # handshake to time out (10 s).  Whether the queue is full at that moment
        # depends on timing, hence several backlogs.
        for backlog in (0, 50, 100, 200, 1000):
            ws, _ = await open_session(gateway.url)
            for _ in range(backlog):
                await ws.send(GOOD_CHUNK)
            await ws.send(json.dumps({"type": "audio.append", "audio": "A" * (2 * 1024 * 1024)}))
            for _ in range(100):
                await ws.send(GOOD_CHUNK)
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await recv(ws, 10)
            assert ws.close_code == 1008
            assert time.monotonic() - started < 5.0, backlog

    async def test_too_many_sessions_for_a_key_closes_4029_with_error_first(self) -> None:
        server = GatewayProcess(
            "quota",
            env={
                "TRANSCRIBE_MAX_SESSIONS_PER_KEY": "2",
                "TRANSCRIBE_LOCAL_DEFAULT_MODEL": "pocketsphinx-en-us",
            },
        )
        try:
            held = [await connect(server.url) for _ in range(2)]
            for ws in held:
                assert (await recv(ws))["type"] == "session.created"
            extra = await connect(server.url)
            await expect_error(extra, "too_many_sessions")
            with pytest.raises(websockets.ConnectionClosed):
                await recv(extra, 5)
            assert extra.close_code == 4029
            other_key = await connect(server.url, TEST_KEYS[1])  # another key is not affected
            assert (await recv(other_key))["type"] == "session.created"
            await held[0].close()
            again = await connect(server.url)
            assert (await recv(again))["type"] == "session.created"
        finally:
            assert server.stop() == 0
