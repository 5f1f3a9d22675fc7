"""The Soniox adapter's own protocol, end to end through /ws against tests/emulators/soniox.py.

What the adapter sends (path, auth header, start request, binary pcm16 at
16 kHz, keepalives, the empty end-of-audio frame), how session options map
onto the start request, and how Soniox's in-band errors reach the client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from tests.cloud.conftest import CloudWorld
from tests.cloud.test_common import (
    FIRST,
    close_and_collect,
    finals_text,
    first_audio,
    ms,
    open_ws,
    session,
)
from tests.emulators.catalog import CASES
from tests.emulators.server import Faults, Record
from tests.emulators.soniox import SonioxEmulator
from tests.server.wsutil import recv_type, send_audio, silence
from tests.textnorm import normalize

CASE = next(c for c in CASES if c.provider == "SONIOX")


@pytest.fixture
def soniox(cloud: CloudWorld) -> SonioxEmulator:
    emulator = cloud.emulator(CASE)
    assert isinstance(emulator, SonioxEmulator)
    emulator.faults = Faults()
    emulator.terminate_after_ms = None
    return emulator


async def short_session(cloud: CloudWorld, **config: Any) -> tuple[dict[str, Any], Record]:
    """Configure, send half a second of silence, close; the start request and the record."""
    emulator = cloud.emulator(CASE)
    before = len(emulator.records)
    ws = await session(cloud, CASE, **config)
    await send_audio(ws, silence(0.5))
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed", messages
    assert not [m for m in messages if m["type"] == "error"], messages
    assert len(emulator.records) == before + 1
    record = emulator.records[-1]
    return record.text[0], record


async def test_client_sends_documented_start_request(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    ws = await session(cloud, CASE, prompt="Go forward ten meters.", endpointing=800)
    audio = np.concatenate([first_audio(), silence(1.5)])
    await send_audio(ws, audio, realtime=2.0)
    final = await recv_type(ws, "transcription.completed", timeout=30)
    messages = await close_and_collect(ws)
    record = soniox.records[-1]
    assert record.path == "/transcribe-websocket"
    assert record.headers["Authorization"] == f"Bearer {soniox.api_key}"
    # The key travels with the connection only (api_key in the request is deprecated).
    assert record.text[0] == {
        "model": "stt-rt-v4",
        "audio_format": "pcm_s16le",
        "sample_rate": 16000,
        "num_channels": 1,
        "enable_endpoint_detection": True,
        "max_endpoint_delay_ms": 800,
        "language_hints": ["en"],
        "context": {"text": "Go forward ten meters."},
    }
    # Binary pcm16 frames of 100 ms, all the audio, then the empty end-of-audio frame.
    assert abs(record.audio_ms - ms(audio)) < 120, (record.audio_ms, ms(audio))
    assert record.binary_frames >= ms(audio) // 100
    assert record.finalized
    assert normalize(final["text"]) == FIRST
    assert messages[-1]["type"] == "session.closed"


async def test_tokens_become_words_with_timings_and_confidence(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    ws = await session(cloud, CASE)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    final = await recv_type(ws, "transcription.completed", timeout=30)
    await close_and_collect(ws)
    # The emulator splits long words into sub-word tokens ("for" + "ward"): one word back.
    assert [normalize(w["word"]) for w in final["words"]] == FIRST.split()
    starts = [w["start_ms"] for w in final["words"]]
    assert starts == sorted(starts) and starts[0] == final["start_ms"]
    assert final["words"][-1]["end_ms"] == final["end_ms"]
    assert all(0 < w["confidence"] <= 1 for w in final["words"])


@pytest.mark.parametrize(("endpointing", "sent"), [(100, 500), (1200, 1200), (5000, 3000)])
async def test_endpointing_maps_to_max_endpoint_delay_in_its_range(
    cloud: CloudWorld, soniox: SonioxEmulator, endpointing: int, sent: int
) -> None:
    start, _ = await short_session(cloud, endpointing=endpointing)
    assert start["enable_endpoint_detection"] is True
    assert start["max_endpoint_delay_ms"] == sent


async def test_language_maps_to_hints_and_multi_to_none(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    start, _ = await short_session(cloud, language="de-DE")
    assert start["language_hints"] == ["de"]
    start, _ = await short_session(cloud, language="multi")
    assert "language_hints" not in start
    assert "context" not in start  # no prompt, no context


async def test_vad_settings_are_reported_unsupported(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    ws, updated = await open_ws_session(cloud, vad={"threshold": 0.6}, prompt="ten meters")
    assert updated["session"]["unsupported"] == ["vad"]
    await close_and_collect(ws)


async def open_ws_session(cloud: CloudWorld, **config: Any) -> tuple[Any, dict[str, Any]]:
    ws, _ = await open_ws(cloud)
    session_config = {"provider": CASE.provider, "model": CASE.model, **config}
    await ws.send(json.dumps({"type": "session.update", "session": session_config}))
    return ws, await recv_type(ws, "session.updated")


async def test_keepalive_keeps_a_paused_stream_open(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    ws = await session(cloud, CASE)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    await asyncio.sleep(6.5)  # no audio for longer than the 5 s keepalive interval
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    assert normalize(finals_text(messages)) == f"{FIRST} {FIRST}"
    record = soniox.records[-1]
    assert record.keepalives >= 1
    assert {"type": "keepalive"} in record.text


async def test_refused_key_is_an_error_response_after_the_upgrade(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    soniox.faults.reject_auth = True
    before = len(soniox.records)
    ws, _ = await open_ws(cloud)
    config = {"provider": CASE.provider, "model": CASE.model}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error"
    assert "SONIOX: authentication refused (error 401" in error["error"]["message"]
    assert error["error"].get("retryable", False) is False
    # Soniox takes the connection and answers the start request with the error.
    assert len(soniox.records) == before + 1
    assert soniox.records[-1].text[0]["model"] == "stt-rt-v4"
    await ws.close()


async def test_provider_error_response_reaches_the_client(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    soniox.terminate_after_ms = 1000  # Soniox's documented early termination (503)
    ws = await session(cloud, CASE)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error"
    message = error["error"]["message"]
    assert "SONIOX: error 503: Cannot continue request" in message, message
    assert error["error"]["retryable"] is True
    await close_and_collect(ws)


async def test_a_stream_finished_before_the_end_of_the_audio_falls_back(
    cloud: CloudWorld, soniox: SonioxEmulator
) -> None:
    # Soniox said "finished" 1 s into 4 s of audio: the stream ended as if all
    # were said, and the rest was dropped without a word.
    soniox.faults.finish_after_ms = 1000
    ws = await session(cloud, CASE, fallback={"provider": "LOCAL", "model": "whisper-tiny.en"})
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    messages = await close_and_collect(ws)
    errors = [m["error"] for m in messages if m["type"] == "error"]
    assert len(errors) == 1, messages
    assert "ended the stream before the end of the audio" in errors[0]["message"]
    assert "switching to the fallback" in errors[0]["message"]
    # The fallback was given the audio again, and said it.
    assert normalize(finals_text(messages)) == FIRST, messages
