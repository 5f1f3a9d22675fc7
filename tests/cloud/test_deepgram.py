"""Deepgram's own protocol details, through the gateway, against its emulator.

What the adapter sends (path, query, auth header, binary linear16 frames of
the documented size, KeepAlive across a pause, Finalize/CloseStream or
ForceEndTurn/CloseStream at the end), how session options map onto the query,
what is reported unsupported, and Deepgram's errors becoming our ``error``.
The message mapping itself is also checked without a network: documented
Deepgram messages in, our events out.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import soxr

from tests.cloud.conftest import CloudWorld
from tests.cloud.test_common import close_and_collect, finals_text, first_audio
from tests.emulators.deepgram import DeepgramEmulator, DeepgramFaults
from tests.emulators.server import Record
from tests.server.wsutil import connect, open_session, recv, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.config import Settings
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.deepgram import DeepgramSTT, FluxStream, NovaStream

NOVA = "nova-3"
FLUX = "flux-general-en"
FIRST = "go forward ten meters"


def emulator(cloud: CloudWorld) -> DeepgramEmulator:
    found = cloud.emulators["DEEPGRAM"]
    assert isinstance(found, DeepgramEmulator)
    found.faults = DeepgramFaults()
    return found


async def run_session(cloud: CloudWorld, model: str, **config: Any) -> tuple[dict[str, Any], Any]:
    ws, updated = await open_session(cloud.gateway.url, provider="DEEPGRAM", model=model, **config)
    assert updated["session"]["provider"] == "DEEPGRAM", updated
    return updated, ws


def frame_ms(record: Record) -> float:
    """Average audio per binary frame (the last one may be short)."""
    return record.audio_ms / max(1, record.binary_frames - 1)


async def test_nova_sends_documented_query_auth_and_frames(cloud: CloudWorld) -> None:
    dg = emulator(cloud)
    updated, ws = await run_session(
        cloud,
        NOVA,
        language="en-US",
        prompt="VoiceRun, Deepgram",
        endpointing=300,
        sample_rate=8000,
    )
    assert updated["session"].get("unsupported", []) == []
    audio = soxr.resample(first_audio(), 16000, 8000)  # the client talks 8 kHz; Deepgram gets 16
    await send_audio(ws, np.concatenate([audio, silence(1.0, 8000)]), rate=8000, realtime=2.0)
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    record = dg.records[-1]
    assert record.path == "/v1/listen"
    assert record.headers["Authorization"] == f"Token {dg.api_key}"
    expected = {
        "model": NOVA,
        "encoding": "linear16",
        "sample_rate": "16000",
        "channels": "1",
        "language": "en-US",
        "interim_results": "true",
        "smart_format": "true",
        "punctuate": "true",
        "endpointing": "300",
        "utterance_end_ms": "1000",
        "vad_events": "true",
    }
    assert {k: record.param(k) for k in expected} == expected
    assert record.query["keyterm"] == ["VoiceRun", "Deepgram"]
    # Audio goes as binary frames of 20 ms, each client chunk at once (it waited for
    # 50 ms: ~22 ms more on every event); text frames carry only control messages.
    assert abs(frame_ms(record) - 20) < 1, frame_ms(record)
    assert [m["type"] for m in record.text] == ["Finalize", "CloseStream"]
    assert record.finalized and not record.closed_by_client  # Deepgram closed after Metadata


async def test_flux_sends_documented_query_and_reports_what_it_lacks(cloud: CloudWorld) -> None:
    dg = emulator(cloud)
    updated, ws = await run_session(
        cloud,
        FLUX,
        language="en-US",
        prompt="VoiceRun",
        endpointing=300,
        vad={"threshold": 0.6},
    )
    unsupported = " ".join(updated["session"]["unsupported"])
    for option in ("endpointing", "vad"):
        assert option in unsupported, unsupported
    assert "prompt" not in unsupported  # keyterms exist on Flux
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    record = dg.records[-1]
    assert record.path == "/v2/listen"
    assert record.headers["Authorization"] == f"Token {dg.api_key}"
    assert record.param("model") == FLUX
    assert record.param("encoding") == "linear16"
    assert record.param("sample_rate") == "16000"
    assert record.query["keyterm"] == ["VoiceRun"]
    for absent in ("language", "endpointing", "eot_timeout_ms", "interim_results"):
        assert record.param(absent) is None, absent  # not /v2/listen parameters
    assert abs(frame_ms(record) - 80) < 1, frame_ms(record)  # Flux wants 80 ms chunks
    assert [m["type"] for m in record.text] == ["ForceEndTurn", "CloseStream"]


@pytest.mark.parametrize(("model", "keepalives"), [(NOVA, 1), (FLUX, 0)])
async def test_pause_longer_than_keepalive_interval(
    cloud: CloudWorld, model: str, keepalives: int
) -> None:
    """Nova gets KeepAlive text frames during a pause; Flux has none (pings suffice)."""
    dg = emulator(cloud)
    _, ws = await run_session(cloud, model)
    await send_audio(ws, np.concatenate([first_audio(), silence(0.8)]), realtime=2.0)
    await recv_type(ws, "transcription.completed", timeout=30)
    await asyncio.sleep(NovaStream.keepalive_interval_s + 1.5)  # no audio at all
    await send_audio(ws, np.concatenate([first_audio(), silence(0.8)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    assert normalize(finals_text(messages)) == FIRST, messages  # the second one
    record = dg.records[-1]
    sent = [m for m in record.text if m["type"] == "KeepAlive"]
    assert record.keepalives == len(sent)
    assert len(sent) >= 1 if keepalives else len(sent) == 0, record.text


@pytest.mark.parametrize(
    ("model", "reason"), [(NOVA, "DATA-0000"), (FLUX, "INTERNAL_SERVER_ERROR")]
)
async def test_deepgram_error_becomes_provider_error(
    cloud: CloudWorld, model: str, reason: str
) -> None:
    dg = emulator(cloud)
    dg.faults = DeepgramFaults(error_after_ms=600)
    _, ws = await run_session(cloud, model)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=20)
    assert error["error"]["code"] == "provider_error", error
    assert "DEEPGRAM" in error["error"]["message"]
    assert reason in error["error"]["message"], error
    await ws.close()


async def test_refused_key_is_not_retryable(cloud: CloudWorld) -> None:
    dg = emulator(cloud)
    dg.faults = DeepgramFaults(reject_auth=True)
    ws = await connect(cloud.gateway.url)
    await recv(ws)
    await ws.send(
        json.dumps({"type": "session.update", "session": {"provider": "DEEPGRAM", "model": NOVA}})
    )
    error = await recv_type(ws, "error", timeout=15)
    assert "authentication refused (HTTP 401)" in error["error"]["message"], error
    assert not error["error"].get("retryable"), error  # a revoked key stays revoked
    await ws.close()


# -- the message mapping, without a network ------------------------------------------


class Captured:
    def __init__(self) -> None:
        self.events: list[SpeechEvent] = []

    async def __call__(self, event: SpeechEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.type.value for e in self.events]


def stream(kind: type[NovaStream] | type[FluxStream], model: str) -> tuple[Any, Captured]:
    made = kind(DeepgramSTT(Settings()), StreamOptions(model=model))
    captured = Captured()
    made.utterances._emit = captured  # observe what the stream reports
    return made, captured


def results(text: str, start: float, duration: float, **flags: Any) -> str:
    words = [
        {
            "word": w.lower(),
            "punctuated_word": w,
            "start": start + i * 0.3,
            "end": start + i * 0.3 + 0.25,
            "confidence": 0.9,
        }
        for i, w in enumerate(text.split())
    ]
    alternative = {"transcript": text, "confidence": 0.9, "words": words}
    return json.dumps(
        {
            "type": "Results",
            "start": start,
            "duration": duration,
            "channel": {"alternatives": [alternative]},
            **flags,
        }
    )


async def test_nova_pieces_accumulate_into_one_final() -> None:
    nova, seen = stream(NovaStream, NOVA)
    for message in (
        json.dumps({"type": "SpeechStarted", "channel": [0], "timestamp": 0.2}),
        results("Go", 0.0, 1.0, is_final=False),
        results("Go forward", 0.0, 1.5, is_final=True, speech_final=False),
        results("ten", 1.5, 0.5, is_final=False),
        results("ten meters.", 1.5, 1.0, is_final=True, speech_final=True),
        json.dumps({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 1.75}),
    ):
        assert await nova.on_message(message) is False
    assert seen.kinds() == [
        "speech_started",
        "partial",
        "partial",
        "partial",
        "partial",
        "final",
        "speech_stopped",
    ]
    partials = [e.text for e in seen.events if e.type is SpeechEventType.PARTIAL]
    assert partials == ["Go", "Go forward", "Go forward ten", "Go forward ten meters."]
    final = seen.events[-2]
    assert final.text == "Go forward ten meters."
    assert (final.start_ms, [w.word for w in final.words]) == (
        0,
        ["Go", "forward", "ten", "meters."],
    )
    assert final.words[0].confidence == 0.9
    assert seen.events[-1].end_ms == 2050  # speech_final: speech stopped after the last word
    assert {e.utterance for e in seen.events} == {0}


async def test_nova_metadata_ends_the_stream_only_after_close_stream() -> None:
    nova, _ = stream(NovaStream, NOVA)
    metadata = json.dumps({"type": "Metadata", "request_id": "r", "duration": 1.0, "channels": 1})
    assert await nova.on_message(metadata) is False
    assert [json.loads(f)["type"] for f in nova.finalize_frames()] == ["Finalize", "CloseStream"]
    assert await nova.on_message(metadata) is True


async def test_flux_turn_events_map_to_one_utterance() -> None:
    flux, seen = stream(FluxStream, FLUX)

    def turn(event: str, text: str, end: float) -> str:
        words = [
            {"word": w, "confidence": 0.8, "start": 0.3 + i * 0.3, "end": 0.5 + i * 0.3}
            for i, w in enumerate(text.split())
        ]
        return json.dumps(
            {
                "type": "TurnInfo",
                "event": event,
                "turn_index": 0,
                "audio_window_start": 0.0,
                "audio_window_end": end,
                "transcript": text,
                "words": words,
                "end_of_turn_confidence": 0.5,
            }
        )

    for message in (
        json.dumps({"type": "Connected", "request_id": "r", "sequence_id": 0}),
        turn("Update", "", 0.25),
        turn("StartOfTurn", "Hi I", 0.6),
        turn("Update", "Hi I need", 0.9),
        turn("EagerEndOfTurn", "Hi I need help", 1.3),
        turn("TurnResumed", "Hi I need help", 1.4),
        turn("EndOfTurn", "Hi I need help.", 1.6),
    ):
        assert await flux.on_message(message) is False
    assert seen.kinds()[0] == "speech_started" and seen.events[0].start_ms == 300
    assert seen.kinds()[-2:] == ["final", "speech_stopped"]
    final = seen.events[-2]
    assert final.text == "Hi I need help."
    assert len(final.words) == 4 and final.end_ms == 1400
    assert seen.events[-1].end_ms == 1400
    assert [json.loads(f)["type"] for f in flux.finalize_frames()] == [
        "ForceEndTurn",
        "CloseStream",
    ]


async def test_flux_error_message_fails_the_stream() -> None:
    flux, _ = stream(FluxStream, FLUX)
    error = {
        "type": "Error",
        "sequence_id": 3,
        "code": "INTERNAL_SERVER_ERROR",
        "description": "boom",
    }
    with pytest.raises(Exception, match="INTERNAL_SERVER_ERROR: boom"):
        await flux.on_message(json.dumps(error))


def test_audio_reaches_deepgram_as_raw_pcm16() -> None:
    nova, _ = stream(NovaStream, NOVA)
    pcm = np.arange(-5, 5, dtype="<i2").tobytes()
    assert nova.audio_frame(pcm) == pcm
    assert json.loads(nova.keepalive_frame()) == {"type": "KeepAlive"}
