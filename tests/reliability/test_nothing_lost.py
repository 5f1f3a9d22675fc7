"""Nothing lost: every way a session can end, what the client receives, and proof that
every word of the audio accepted before the end is in a ``transcription.completed``.

The audio is two utterances of real speech ("go forward ten meters", twice),
the second cut right after its last word, so there is no trailing silence
for the VAD to end it on: only a correct end-of-session flush transcribes it.

| end | the client receives |
|---|---|
| ``session.close`` | finals of all audio, ``session.closed`` (client_close), close 1000 |
| idle timeout | the same, reason ``idle_timeout`` |
| client vanishes | nothing (it is gone); the server meters all its audio and frees it at once |
| SIGTERM drain | finals of all audio accepted (``usage``), ``session.closed`` (shutdown), 1000 |
| provider failure + fallback | ``provider_error``, ``session.updated`` (fallback), finals of all audio |
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import websockets

from tests.conftest import SHARED_AUDIO, GatewayProcess
from tests.emulators.deepgram import DeepgramEmulator
from tests.server.wsutil import collect, finals, open_session, recv, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio

RATE = 16000
SAYING = "go forward ten meters"
EXPECTED = f"{SAYING} {SAYING}"
LOCAL = {"provider": "LOCAL", "model": "whisper-tiny.en"}


def speech() -> np.ndarray:
    """One utterance, ending right after "meters"."""
    return read_audio(SHARED_AUDIO / "goforward.raw")[: int(2.35 * RATE)]


def two_utterances() -> np.ndarray:
    return np.concatenate([speech(), silence(1.0), speech()])


def metric(gateway: GatewayProcess, sample: str) -> float:
    return gateway.metric(sample) or 0.0


def assert_ended_gracefully(messages: list[dict[str, Any]], reason: str) -> None:
    closed = messages[-1]
    assert closed["type"] == "session.closed", messages[-3:]
    assert closed["reason"] == reason
    completed = [i for i, m in enumerate(messages) if m["type"] == "transcription.completed"]
    assert completed and completed[-1] < len(messages) - 1  # every final before session.closed


async def reference_transcript(url: str, audio: np.ndarray) -> str:
    """What the engine makes of ``audio`` in a session ended cleanly by ``session.close``."""
    ws, _ = await open_session(url, retry_busy=True)
    await send_audio(ws, audio)
    await ws.send(json.dumps({"type": "session.close"}))
    return normalize(finals(await collect(ws, 60)))


class TestClientClose:
    async def test_close_right_after_the_last_word_transcribes_every_word(
        self, gateway: GatewayProcess
    ) -> None:
        audio = two_utterances()
        ws, _ = await open_session(gateway.url, retry_busy=True)
        await send_audio(ws, audio)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        assert normalize(finals(messages)) == EXPECTED
        assert_ended_gracefully(messages, "client_close")
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(len(audio) / RATE, abs=0.02)
        assert ws.close_code == 1000


class TestIdleTimeout:
    async def test_listening_client_gets_every_word_then_closed(
        self, gateway: GatewayProcess
    ) -> None:
        ws, _ = await open_session(gateway.url, retry_busy=True)
        await send_audio(ws, two_utterances())
        messages = await collect(ws, 60)  # sends nothing more: the 3 s idle timeout ends it
        assert normalize(finals(messages)) == EXPECTED
        assert_ended_gracefully(messages, "idle_timeout")
        assert ws.close_code == 1000


class TestClientVanishes:
    async def test_vanished_client_audio_is_metered_and_everything_freed_at_once(
        self, gateway: GatewayProcess
    ) -> None:
        audio_sample = 'transcribe_audio_seconds_total{provider="LOCAL"}'
        gone_sample = 'transcribe_sessions_total{reason="client_disconnected"}'
        audio_before = metric(gateway, audio_sample)
        gone_before = metric(gateway, gone_sample)
        audio = two_utterances()
        ws, _ = await open_session(gateway.url, retry_busy=True)
        await send_audio(ws, audio)
        # Wait until the server has read every chunk (messages are handled in
        # order: the answer to a bad frame sent last proves it), then vanish
        # mid-utterance.
        await ws.send("{not json")
        while (await recv(ws, 10)).get("type") != "error":
            pass
        ws.transport.abort()  # no close frame: nobody is left to hear a final
        started = time.monotonic()
        while gateway.health()["sessions"] or any(gateway.health()["streams"]["LOCAL"].values()):
            assert time.monotonic() - started < 2.0, gateway.health()
            await asyncio.sleep(0.05)
        assert metric(gateway, audio_sample) - audio_before == pytest.approx(
            len(audio) / RATE, abs=0.01
        )
        assert metric(gateway, gone_sample) == gone_before + 1


class TestShutdownDrain:
    async def test_sigterm_transcribes_all_accepted_audio_of_every_session(
        self, gateway: GatewayProcess
    ) -> None:
        server = await asyncio.to_thread(
            GatewayProcess,
            "nothing-lost-sigterm",
            {"TRANSCRIBE_IDLE_TIMEOUT_S": "60", "TRANSCRIBE_DRAIN_TIMEOUT_S": "20"},
        )
        try:
            audio = two_utterances()
            # A: all its audio is in, it just listens.
            listener, _ = await open_session(server.url)
            await send_audio(listener, audio)
            # B: streams in real time and is mid-way through its second utterance at SIGTERM.
            streamer, _ = await open_session(server.url)
            listening = asyncio.create_task(collect(listener, 60))
            hearing = asyncio.create_task(collect(streamer, 60))

            async def stream() -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await send_audio(streamer, np.concatenate([audio, silence(2.0)]), realtime=1.0)

            sender = asyncio.create_task(stream())
            await asyncio.sleep((len(speech()) / RATE) + 1.0 + 1.2)  # inside "forward ten"
            server.proc.send_signal(signal.SIGTERM)
            got_a, got_b = await asyncio.gather(listening, hearing)
            sender.cancel()
            assert server.proc.wait(30) == 0
        finally:
            await asyncio.to_thread(server.stop)
        assert normalize(finals(got_a)) == EXPECTED
        assert_ended_gracefully(got_a, "shutdown")
        assert_ended_gracefully(got_b, "shutdown")
        # B's audio after the drain began was refused out loud, never dropped silently ...
        accepted = got_b[-1]["usage"]["audio_seconds"]
        refused = [m for m in got_b if m["type"] == "error"]
        assert refused and all(
            m["error"]["code"] == "session_closing"
            and m["error"]["message"] == "the server is shutting down; chunk dropped"
            for m in refused
        ), refused
        assert accepted < len(audio) / RATE
        # ... and all it accepted is transcribed as a clean close of that audio would be.
        expected_b = await reference_transcript(gateway.url, audio[: round(accepted * RATE)])
        assert expected_b.startswith(SAYING)
        assert normalize(finals(got_b)) == expected_b


class TestProviderFailureWithFallback:
    async def test_engine_failing_mid_stream_loses_no_word(self, gateway: GatewayProcess) -> None:
        ws, updated = await open_session(
            gateway.url, provider="FAULTY", model="fail-after-audio", fallback=LOCAL
        )
        assert updated["session"]["provider"] == "FAULTY"
        await send_audio(ws, two_utterances(), realtime=4.0)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        kinds = [m["type"] for m in messages]
        assert messages[kinds.index("error")]["error"]["code"] == "provider_error"
        assert messages[kinds.index("session.updated")]["session"]["provider"] == "LOCAL"
        assert normalize(finals(messages)) == EXPECTED
        assert_ended_gracefully(messages, "client_close")


@pytest.fixture(scope="module")
async def deepgram_world() -> AsyncIterator[tuple[GatewayProcess, DeepgramEmulator]]:
    async with DeepgramEmulator() as deepgram:
        env = {"DEEPGRAM_API_KEY": deepgram.api_key, "DEEPGRAM_BASE_URL": deepgram.url}
        server = await asyncio.to_thread(GatewayProcess, "nothing-lost-deepgram", env)
        try:
            yield server, deepgram
        finally:
            await asyncio.to_thread(server.stop)


class TestCloudProviderDropWithFallback:
    async def test_drop_after_a_final_replays_only_the_audio_not_yet_final(
        self, deepgram_world: tuple[GatewayProcess, DeepgramEmulator]
    ) -> None:
        server, deepgram = deepgram_world
        first = np.concatenate([speech(), silence(2.0)])
        # The connection is cut (no close frame) 1.2 s into the second utterance.
        deepgram.faults.drop_after_ms = len(first) / RATE * 1000 + 1200
        ws, updated = await open_session(
            server.url, provider="DEEPGRAM", model="nova-3", fallback=LOCAL
        )
        assert updated["session"]["provider"] == "DEEPGRAM"
        await send_audio(ws, np.concatenate([first, speech()]), realtime=1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        errors = [m for m in messages if m["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["provider_error"], errors
        before = normalize(finals(messages[: messages.index(errors[0])]))
        after = normalize(finals(messages[messages.index(errors[0]) :]))
        assert before == SAYING  # Deepgram's final, before the drop
        assert after == SAYING  # the replayed second utterance: "go forward" was said pre-drop
        assert_ended_gracefully(messages, "client_close")
        assert ws.close_code == 1000
