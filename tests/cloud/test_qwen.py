"""The Qwen3-ASR realtime adapter's own protocol, through /ws against tests/emulators/qwen.py.

What the adapter sends (path, model query, auth and beta headers,
``session.update``, base64 ``input_audio_buffer.append`` at 16 kHz,
``session.finish``), how options map onto ``session.update`` (our VAD
threshold on Qwen's scale, endpointing clamped into Qwen's range), that silence
(when Qwen says nothing) is not taken for a dead provider, that each
utterance's ``speech.stopped`` follows its final, and how Qwen's errors reach
the client.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tests.cloud.conftest import RESPONSE_TIMEOUT_S, CloudWorld
from tests.cloud.test_common import (
    FIRST,
    close_and_collect,
    finals_text,
    first_audio,
    ms,
    open_ws,
)
from tests.emulators.catalog import CASES
from tests.emulators.qwen import QwenEmulator
from tests.emulators.server import Faults
from tests.server.wsutil import open_session, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.providers.qwen import qwen_threshold

CASE = next(c for c in CASES if c.provider == "QWEN3")


@pytest.fixture
def qwen(cloud: CloudWorld) -> QwenEmulator:
    emulator = cloud.emulator(CASE)
    assert isinstance(emulator, QwenEmulator)
    emulator.faults = Faults()
    return emulator


async def test_client_sends_documented_events(cloud: CloudWorld, qwen: QwenEmulator) -> None:
    ws, updated = await configure(
        cloud, prompt="Go forward ten meters.", endpointing=700, vad={"threshold": 0.6}
    )
    assert "unsupported" not in updated["session"]  # prompt, endpointing, vad all mapped
    audio = np.concatenate([first_audio(), silence(1.5)])
    await send_audio(ws, audio, realtime=2.0)
    final = await recv_type(ws, "transcription.completed", timeout=30)
    messages = await close_and_collect(ws)
    assert messages[-1]["type"] == "session.closed"
    assert normalize(final["text"]) == FIRST
    record = qwen.records[-1]
    assert record.path == "/api-ws/v1/realtime"
    assert record.param("model") == "qwen3-asr-flash-realtime"
    assert record.headers["Authorization"] == f"Bearer {qwen.api_key}"
    assert record.headers["OpenAI-Beta"] == "realtime=v1"
    first, *appends, last = record.text
    assert first["type"] == "session.update"
    assert first["session"] == {
        "input_audio_format": "pcm",
        "sample_rate": 16000,
        "input_audio_transcription": {
            "language": "en",
            "corpus": {"text": "Go forward ten meters."},
        },
        # Our 0.6 on Qwen's [-1, 1] scale (see test_vad_threshold_maps_onto_qwens_scale).
        "turn_detection": {"type": "server_vad", "threshold": 0.36, "silence_duration_ms": 700},
    }
    assert {e["type"] for e in appends} == {"input_audio_buffer.append"}
    assert last["type"] == "session.finish"
    assert record.finalized
    ids = [e["event_id"] for e in record.text]
    assert len(set(ids)) == len(ids)  # every event has its own id
    # Base64 pcm16 at 16 kHz: the emulator decoded and heard all of it.
    assert abs(record.audio_ms - ms(audio)) < 120, (record.audio_ms, ms(audio))
    assert len(appends) >= ms(audio) // 100


def test_vad_threshold_maps_onto_qwens_scale() -> None:
    # Qwen: "Default: 0.2. Recommended: 0.0. Range: [-1, 1]. Lower values increase
    # sensitivity" (https://docs.qwencloud.com/api-reference/speech-recognition/
    # qwen-asr-realtime/python-sdk); ours is a speech probability, default 0.5.
    assert qwen_threshold(0.5) is None  # our default: Qwen's own (0.2) applies
    assert [qwen_threshold(t) for t in (0.0, 0.05, 0.25, 0.6, 0.95, 1.0)] == [
        -1.0,
        -0.88,
        -0.4,
        0.36,
        0.92,
        1.0,
    ]
    below, above = qwen_threshold(0.499), qwen_threshold(0.501)
    assert below is not None and above is not None and below < 0.2 < above  # no jump at 0.5


@pytest.mark.parametrize(
    ("endpointing", "sent"), [(None, 500), (100, 200), (8000, 6000)], ids=["default", "low", "high"]
)
async def test_turn_detection_within_qwens_ranges(
    cloud: CloudWorld, qwen: QwenEmulator, endpointing: int | None, sent: int
) -> None:
    # silence_duration_ms: "Range: [200, 6000]" (same page); the emulator refuses
    # values outside with an error, as Qwen does.
    config = {} if endpointing is None else {"endpointing": endpointing}
    ws, _ = await configure(cloud, **config)
    await send_audio(ws, silence(0.3))
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    turn = qwen.records[-1].text[0]["session"]["turn_detection"]
    assert turn == {"type": "server_vad", "silence_duration_ms": sent}  # no threshold: Qwen's


async def test_multi_language_lets_qwen_detect(cloud: CloudWorld, qwen: QwenEmulator) -> None:
    ws, _ = await configure(cloud, language="multi")
    await send_audio(ws, silence(0.3))
    await close_and_collect(ws)
    assert qwen.records[-1].text[0]["session"]["input_audio_transcription"] == {}


async def test_silence_longer_than_the_response_timeout_is_not_a_failure(
    cloud: CloudWorld, qwen: QwenEmulator
) -> None:
    # Qwen says nothing while nobody speaks: that must not count as a dead provider.
    ws, _ = await configure(cloud)
    quiet = silence(RESPONSE_TIMEOUT_S + 2)
    audio = np.concatenate([quiet, first_audio(), silence(1.5)])
    await send_audio(ws, audio, realtime=2.0)
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    assert normalize(finals_text(messages)) == FIRST
    started = next(m for m in messages if m["type"] == "speech.started")
    assert started["audio_start_ms"] >= ms(quiet)  # Qwen's item times on our timeline


async def test_refused_key_fails_the_handshake(cloud: CloudWorld, qwen: QwenEmulator) -> None:
    qwen.faults.reject_auth = True
    before = len(qwen.records)
    ws, _ = await open_ws(cloud)
    config = {"provider": CASE.provider, "model": CASE.model}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error"
    assert error["error"]["message"] == "QWEN3: authentication refused (HTTP 401)"
    assert len(qwen.records) == before  # refused before any WebSocket session
    await ws.close()


async def test_error_event_reaches_the_client(cloud: CloudWorld, qwen: QwenEmulator) -> None:
    ws, _ = await open_ws(cloud)
    config = {"provider": CASE.provider, "model": CASE.model, "language": "xx"}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error"
    message = error["error"]["message"]
    assert message.startswith("QWEN3: invalid_value: Invalid value: 'xx'"), message
    await ws.close()


async def configure(cloud: CloudWorld, **config: Any) -> tuple[Any, dict[str, Any]]:
    """A session served by QWEN3: the socket and its ``session.updated``."""
    ws, updated = await open_session(
        cloud.gateway.url, provider=CASE.provider, model=CASE.model, **config
    )
    assert updated["session"]["provider"] == CASE.provider, updated
    return ws, updated
