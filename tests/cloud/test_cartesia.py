"""Cartesia's own protocol details, through the gateway, against its emulator.

What the adapter sends (path, query, ``X-API-Key`` and ``Cartesia-Version``
headers, binary pcm_s16le frames of 100 ms, ``finalize`` at each end of speech
and as keepalive across a pause, ``done`` at the end), how session options map
onto the query, what is reported unsupported, and Cartesia's ``error`` message
becoming our ``error``, and deltas that split words joined verbatim.  The
message mapping (deltas, chunk-relative word times) is also checked without a
network: documented messages in, our events out.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import soxr

from tests.cloud.conftest import CloudWorld
from tests.cloud.test_common import (
    close_and_collect,
    finals_text,
    first_audio,
    ms,
    speak_pause_speak,
)
from tests.emulators.cartesia import CartesiaEmulator
from tests.emulators.server import Faults, Record
from tests.server.wsutil import open_session, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.cartesia import API_VERSION, CartesiaStream, CartesiaSTT

MODEL = "ink-whisper"
FIRST = "go forward ten meters"


@pytest.fixture
async def cartesia(cloud: CloudWorld) -> AsyncIterator[CartesiaEmulator]:
    found = cloud.emulators["CARTESIA"]
    assert isinstance(found, CartesiaEmulator)
    found.faults = Faults()
    yield found
    found.idle_close_s = CartesiaEmulator.idle_close_s
    found.fail_after_ms = None


async def run_session(cloud: CloudWorld, **config: Any) -> tuple[dict[str, Any], Any]:
    ws, updated = await open_session(cloud.gateway.url, provider="CARTESIA", model=MODEL, **config)
    assert updated["session"]["provider"] == "CARTESIA", updated
    return updated, ws


def commands(record: Record) -> list[str]:
    return [m["command"] for m in record.text if "command" in m]


async def test_sends_documented_query_headers_frames_and_commands(
    cloud: CloudWorld, cartesia: CartesiaEmulator
) -> None:
    updated, ws = await run_session(
        cloud, language="en-US", endpointing=700, sample_rate=8000, vad={"threshold": 0.6}
    )
    assert updated["session"].get("unsupported", []) == []
    audio = soxr.resample(first_audio(), 16000, 8000)  # the client talks 8 kHz; Cartesia gets 16
    await send_audio(ws, np.concatenate([audio, silence(1.5, 8000)]), rate=8000, realtime=2.0)
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    record = cartesia.records[-1]
    assert record.path == "/stt/websocket"
    assert record.headers["X-API-Key"] == cartesia.api_key
    assert record.headers["Cartesia-Version"] == API_VERSION
    expected = {
        "model": MODEL,
        "language": "en",
        "encoding": "pcm_s16le",
        "sample_rate": "16000",
        "max_silence_duration_secs": "0.7",
    }
    assert {k: record.param(k) for k in expected} == expected
    assert record.param("min_volume") is None  # a volume, not our speech probability
    # Binary frames of 100 ms (plus a shorter one before each finalize: the
    # audio up to a command goes first); text frames only for commands.
    full = math.ceil(record.audio_ms / 100)
    assert full <= record.binary_frames <= full + commands(record).count("finalize"), record
    # finalize once the gateway's VAD heard the end of speech, done at the close.
    assert commands(record) == ["finalize", "done"], record.text
    finalize_at = record.text[0]["audio_ms"]
    assert ms(first_audio()) < finalize_at < record.audio_ms
    assert record.finalized


async def test_reports_prompt_unsupported_and_passes_the_language(
    cloud: CloudWorld, cartesia: CartesiaEmulator
) -> None:
    updated, ws = await run_session(cloud, language="de-DE", prompt="VoiceRun")
    session = updated["session"]
    assert session["unsupported"] == ["prompt"], session  # no keyterms for ink-whisper
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    await close_and_collect(ws)
    record = cartesia.records[-1]
    assert record.param("language") == "de"
    assert not any(name.startswith("key") for name in record.query), record.query


async def test_finalize_keeps_the_connection_open_across_a_pause(
    cloud: CloudWorld, cartesia: CartesiaEmulator
) -> None:
    # Shorter than the pause; the keepalive comes after 5 s without audio.
    cartesia.idle_close_s = 7.0
    connections = len(cartesia.records)
    _, ws = await run_session(cloud)
    messages, _ = await speak_pause_speak(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert [normalize(m["text"]) for m in finals] == [FIRST, FIRST], messages
    assert len(cartesia.records) == connections + 1  # one connection throughout
    assert cartesia.records[-1].keepalives >= 1


async def test_error_message_becomes_provider_error(
    cloud: CloudWorld, cartesia: CartesiaEmulator
) -> None:
    cartesia.fail_after_ms = 1000
    _, ws = await run_session(cloud)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error", error
    assert "CARTESIA" in error["error"]["message"]
    assert "transcriber failed" in error["error"]["message"]
    await ws.send(json.dumps({"type": "session.close"}))


async def test_split_deltas_join_into_whole_words(
    cloud: CloudWorld, cartesia: CartesiaEmulator
) -> None:
    # The emulator cuts each final inside a word ("go forw" + "ard ten meters")
    # and starts later chunks with their word's space, as Cartesia's deltas do.
    _, ws = await run_session(cloud)
    utterance = np.concatenate([first_audio(), silence(1.5)])
    await send_audio(ws, np.concatenate([utterance, utterance]), realtime=2.0)
    messages = await close_and_collect(ws)
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert len(finals) == 2, messages
    for final in finals:
        text = final["text"]
        assert normalize(text) == FIRST, text
        assert text == text.strip() and "  " not in text, text
        same = [m for m in messages if m.get("utterance_id") == final["utterance_id"]]
        partials = [m["text"] for m in same if m["type"] == "transcription.partial"]
        assert partials[-1] == text, partials  # the whole utterance, as the final says it


# -- message mapping, without a network ------------------------------------------------


def stream() -> CartesiaStream:
    stt = CartesiaSTT(Settings())
    return CartesiaStream(stt, StreamOptions(model=MODEL))


def drain(s: CartesiaStream) -> list[SpeechEvent]:
    out = []
    while not s._events.empty():
        item = s._events.get_nowait()
        assert isinstance(item, SpeechEvent)
        out.append(item)
    return out


def transcript(final: bool, text: str, duration: float, words: list[Any]) -> str:
    return json.dumps(
        {
            "type": "transcript",
            "is_final": final,
            "request_id": "r",
            "text": text,
            "duration": duration,
            "language": "en",
            "words": [{"word": w, "start": a, "end": b} for w, a, b in words],
        }
    )


async def test_deltas_become_utterances_with_chunk_relative_times() -> None:
    s = stream()
    await s.on_message(transcript(False, "How are", 0.8, [("How", 0.2, 0.4), ("are", 0.45, 0.6)]))
    await s.on_message(
        transcript(
            True, "How are you?", 2.5, [("How", 0.2, 0.4), ("are", 0.45, 0.6), ("you?", 0.7, 0.9)]
        )
    )
    # The next chunk's words are relative to its own start, 2.5 s into the stream.
    await s.on_message(transcript(True, " Fine.", 1.0, [("Fine.", 0.1, 0.5)]))
    events = drain(s)
    finals = [e for e in events if e.type is SpeechEventType.FINAL]
    assert [f.text for f in finals] == ["How are you?", "Fine."]
    assert [(w.start_ms, w.end_ms) for w in finals[0].words] == [(200, 400), (450, 600), (700, 900)]
    assert [(w.start_ms, w.end_ms) for w in finals[1].words] == [(2600, 3000)]
    partials = [e.text for e in events if e.type is SpeechEventType.PARTIAL]
    assert partials[0] == "How are"
    assert await s.on_message(json.dumps({"type": "done", "request_id": "r"})) is True


async def test_deltas_are_concatenated_verbatim() -> None:
    # https://docs.cartesia.ai/use-the-api/stt/common-pitfalls: "Insert" +
    # "ing spaces is not safe"; the next utterance's delta starts with its space.
    s = stream()
    s.expect_flush()  # the gateway's VAD heard the end of speech: finalize went out
    await s.on_message(transcript(False, "Insert", 0.5, [("Insert", 0.1, 0.5)]))
    await s.on_message(transcript(True, "Insert", 0.5, [("Insert", 0.1, 0.5)]))
    await s.on_message(transcript(False, "ing spaces", 0.4, [("spaces", 0.1, 0.4)]))
    await s.on_message(
        transcript(True, "ing spaces is not", 0.8, [("spaces", 0.1, 0.4), ("is", 0.45, 0.6)])
    )
    await s.on_message(transcript(True, " ", 0.1, []))
    await s.on_message(transcript(True, "safe.", 0.5, [("safe.", 0.0, 0.4)]))
    await s.on_message(json.dumps({"type": "flush_done", "request_id": "r"}))
    await s.on_message(transcript(True, " Fine.", 1.0, [("Fine.", 0.1, 0.5)]))
    events = drain(s)
    partials = [e.text for e in events if e.type is SpeechEventType.PARTIAL]
    assert partials[:4] == ["Insert", "Insert", "Inserting spaces", "Inserting spaces is not"]
    finals = [e for e in events if e.type is SpeechEventType.FINAL]
    assert [f.text for f in finals] == ["Inserting spaces is not safe.", "Fine."]
    assert (finals[0].start_ms, finals[0].end_ms) == (100, 1800)


async def test_error_messages_name_the_cause() -> None:
    s = stream()
    with pytest.raises(ProviderError) as refused:
        await s.on_message(json.dumps({"type": "error", "message": "Invalid API key", "code": 401}))
    assert "authentication refused" in refused.value.reason and not refused.value.retryable
    with pytest.raises(ProviderError) as failed:
        await s.on_message(json.dumps({"type": "error", "error": "busy", "request_id": "r"}))
    assert "busy" in failed.value.reason and failed.value.retryable
