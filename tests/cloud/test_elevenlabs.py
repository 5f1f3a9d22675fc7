"""ElevenLabs' own protocol details, through the gateway, against its emulator.

What the adapter sends (path, query, ``xi-api-key``, base64 ``input_audio_chunk``
messages of 100 ms at 16 kHz, ``previous_text`` with the first chunk only, a
commit at each end of speech and one at the end, silent chunks across a
pause), how session options map onto the query, and ElevenLabs' error
messages becoming our ``error``.  The message mapping (word pieces, logprob,
keepalive silence taken out of the times) is also checked without a network.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.cloud.conftest import CloudWorld
from tests.cloud.test_common import (
    close_and_collect,
    finals_text,
    first_audio,
    ms,
    speak_pause_speak,
)
from tests.emulators.elevenlabs import ElevenLabsEmulator
from tests.emulators.server import Faults
from tests.server.wsutil import open_session, recv_type, send_audio, silence
from tests.textnorm import normalize
from transcribe_gateway.config import Settings
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.elevenlabs import ElevenLabsStream, ElevenLabsSTT

MODEL = "scribe-v2-realtime"
FIRST = "go forward ten meters"
PROMPT = "Robot commands: go, turn, stop"


@pytest.fixture
async def eleven(cloud: CloudWorld) -> AsyncIterator[ElevenLabsEmulator]:
    found = cloud.emulators["ELEVENLABS"]
    assert isinstance(found, ElevenLabsEmulator)
    found.faults = Faults()
    yield found
    found.idle_close_s = None
    found.fail_after = None


async def run_session(cloud: CloudWorld, **config: Any) -> tuple[dict[str, Any], Any]:
    ws, updated = await open_session(
        cloud.gateway.url, provider="ELEVENLABS", model=MODEL, **config
    )
    assert updated["session"]["provider"] == "ELEVENLABS", updated
    return updated, ws


async def test_sends_documented_query_header_and_chunks(
    cloud: CloudWorld, eleven: ElevenLabsEmulator
) -> None:
    updated, ws = await run_session(
        cloud, language="en-US", prompt=PROMPT, endpointing=700, vad={"threshold": 0.6}
    )
    assert updated["session"].get("unsupported", []) == []
    await send_audio(ws, np.concatenate([first_audio(), silence(1.5)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    record = eleven.records[-1]
    assert record.path == "/v1/speech-to-text/realtime"
    assert record.headers["xi-api-key"] == eleven.api_key
    expected = {
        "model_id": "scribe_v2_realtime",
        "audio_format": "pcm_16000",
        "commit_strategy": "manual",
        "include_timestamps": "true",
        "language_code": "en",
    }
    assert {k: record.param(k) for k in expected} == expected
    chunks = record.text
    assert {c["message_type"] for c in chunks} == {"input_audio_chunk"}
    assert {c["sample_rate"] for c in chunks} == {16000}
    # The prompt is context for the first chunk only.
    assert chunks[0]["previous_text"] == PROMPT
    assert all("previous_text" not in c for c in chunks[1:])
    # Audio: base64 pcm16 of 100 ms per chunk; the one before a commit and the
    # last may be shorter (the audio up to the commit goes first).
    commits = [i for i, c in enumerate(chunks) if c["commit"]]
    short = {i - 1 for i in commits} | {len(chunks) - 1}
    full = [
        len(base64.b64decode(c["audio_base_64"]))
        for i, c in enumerate(chunks)
        if not c["commit"] and i not in short
    ]
    assert set(full) == {3200}, set(full)
    sizes = [len(base64.b64decode(c["audio_base_64"])) for c in chunks if not c["commit"]]
    # A commit once the gateway's VAD heard the end of speech, and one at the end.
    assert len(commits) == 2 and commits[-1] == len(chunks) - 1, commits
    assert all(chunks[i]["audio_base_64"] == "" for i in commits)
    speech_end = sum(sizes[: commits[0]]) / 32
    assert ms(first_audio()) < speech_end < record.audio_ms


async def test_multi_language_lets_elevenlabs_detect(
    cloud: CloudWorld, eleven: ElevenLabsEmulator
) -> None:
    updated, ws = await run_session(cloud, language="multi")
    assert updated["session"].get("unsupported", []) == []
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    messages = await close_and_collect(ws)
    assert normalize(finals_text(messages)) == FIRST, messages
    assert eleven.records[-1].param("language_code") is None


async def test_silence_keeps_the_connection_open_across_a_pause(
    cloud: CloudWorld, eleven: ElevenLabsEmulator
) -> None:
    # Shorter than the pause; a silent chunk goes after 5 s without audio.
    eleven.idle_close_s = 7.0
    connections = len(eleven.records)
    _, ws = await run_session(cloud)
    messages, utterance = await speak_pause_speak(ws)
    assert not [m for m in messages if m["type"] == "error"], messages
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    assert [normalize(m["text"]) for m in finals] == [FIRST, FIRST], messages
    assert len(eleven.records) == connections + 1  # one connection throughout
    assert eleven.records[-1].keepalives >= 1
    # Times are on the client's clock: the keepalive silence is taken out.
    shift = finals[1]["start_ms"] - finals[0]["start_ms"]
    assert abs(shift - ms(utterance)) < 60, (shift, ms(utterance))  # 100 ms if not taken out


async def test_error_message_becomes_provider_error(
    cloud: CloudWorld, eleven: ElevenLabsEmulator
) -> None:
    eleven.fail_after = (1000, "quota_exceeded", "You have exceeded your quota.")
    _, ws = await run_session(cloud)
    await send_audio(ws, np.concatenate([first_audio(), silence(1.0)]), realtime=2.0)
    error = await recv_type(ws, "error", timeout=15)
    assert error["error"]["code"] == "provider_error", error
    assert "ELEVENLABS" in error["error"]["message"]
    assert "quota_exceeded" in error["error"]["message"]
    await ws.send(json.dumps({"type": "session.close"}))


# -- message mapping, without a network ------------------------------------------------


def stream(prompt: str | None = None) -> ElevenLabsStream:
    return ElevenLabsStream(ElevenLabsSTT(Settings()), StreamOptions(model=MODEL, prompt=prompt))


def drain(s: ElevenLabsStream) -> list[SpeechEvent]:
    out = []
    while not s._events.empty():
        item = s._events.get_nowait()
        assert isinstance(item, SpeechEvent)
        out.append(item)
    return out


def word(text: str, start: float, end: float, kind: str = "word") -> dict[str, Any]:
    return {"text": text, "start": start, "end": end, "type": kind, "logprob": -0.1}


async def test_committed_words_skip_spacing_and_keepalive_silence() -> None:
    s = stream()
    s.audio_frame(bytes(32000))  # 1 s of audio sent
    s.keepalive_frame()  # then 100 ms of keepalive silence
    await s.on_message(json.dumps({"message_type": "partial_transcript", "text": "Hello"}))
    await s.on_message(json.dumps({"message_type": "committed_transcript", "text": "Hello, world"}))
    await s.on_message(
        json.dumps(
            {
                "message_type": "committed_transcript_with_timestamps",
                "text": "Hello, world",
                "language_code": "en",
                "words": [
                    word("Hello", 0.5, 0.8),
                    word(",", 0.8, 0.8, "punctuation"),
                    word(" ", 0.8, 1.2, "spacing"),
                    word("world", 1.2, 1.5),
                ],
            }
        )
    )
    events = drain(s)
    assert [e.type for e in events][:2] == [SpeechEventType.SPEECH_STARTED, SpeechEventType.PARTIAL]
    (final,) = [e for e in events if e.type is SpeechEventType.FINAL]
    assert final.text == "Hello, world"
    # "world" came after the 100 ms of keepalive silence inserted at 1 s.
    assert [(w.word, w.start_ms, w.end_ms) for w in final.words] == [
        ("Hello", 500, 800),
        ("world", 1100, 1400),
    ]
    assert final.words[0].confidence == round(math.exp(-0.1), 4)


async def test_previous_text_is_the_prompt_tail_on_the_first_chunk() -> None:
    s = stream("one two three four five six seven eight nine ten eleven twelve thirteen")
    first = json.loads(s.audio_frame(bytes(3200)))
    second = json.loads(s.audio_frame(bytes(3200)))
    assert first["previous_text"] == "six seven eight nine ten eleven twelve thirteen"
    assert len(first["previous_text"]) <= 50
    assert "previous_text" not in second
    assert first["commit"] is False and first["sample_rate"] == 16000


async def test_error_messages_name_the_cause() -> None:
    s = stream()
    with pytest.raises(ProviderError) as refused:
        await s.on_message(json.dumps({"message_type": "auth_error", "error": "Invalid key"}))
    assert "authentication refused" in refused.value.reason and not refused.value.retryable
    with pytest.raises(ProviderError) as limited:
        await s.on_message(json.dumps({"message_type": "rate_limited", "error": "slow down"}))
    assert "rate_limited" in limited.value.reason and limited.value.retryable
    # Unknown informational messages are not errors.
    assert await s.on_message(json.dumps({"message_type": "something_new"})) is False


class ScriptedVad:
    """The gateway VAD, giving the boundaries a test hands it, one call at a time."""

    def __init__(self) -> None:
        self.due: list[SimpleNamespace] = []

    def inline(self, samples: Any) -> bool:
        return True  # heard at once, as a short chunk is

    def process(self, samples: Any) -> list[SimpleNamespace]:
        due, self.due = self.due, []
        return due


async def boundary(s: ElevenLabsStream, vad: ScriptedVad, kind: str, at_ms: int) -> None:
    vad.due = [SimpleNamespace(kind=kind, sample=at_ms * 16)]  # 16 kHz samples
    await s._on_audio(np.zeros(16, np.int16))


async def test_speech_starting_between_the_commit_answers_waits_for_the_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The commit was taken as answered at committed_transcript, but the words
    # come with committed_transcript_with_timestamps: a speech start heard in
    # between closed the utterance with its partial as the final, and the
    # committed text became a second, duplicate final in the next utterance.
    s = stream()
    vad = ScriptedVad()
    monkeypatch.setattr(s, "_vad", vad)
    await boundary(s, vad, "start", 100)
    await s.on_message(json.dumps({"message_type": "partial_transcript", "text": "go forward ten"}))
    await boundary(s, vad, "end", 2400)  # the commit goes out
    committed = "Go forward ten meters."
    await s.on_message(json.dumps({"message_type": "committed_transcript", "text": committed}))
    await boundary(s, vad, "start", 2500)  # the next speech, before the timestamps
    await s.on_message(
        json.dumps(
            {
                "message_type": "committed_transcript_with_timestamps",
                "text": committed,
                "words": [word("Go", 0.1, 0.3), word("meters.", 1.9, 2.3)],
            }
        )
    )
    await s.on_message(json.dumps({"message_type": "partial_transcript", "text": "turn left"}))
    events = [(e.utterance, e.type, e.text) for e in drain(s)]
    finals = [(u, text) for u, kind, text in events if kind is SpeechEventType.FINAL]
    assert finals == [(0, committed)], events
    first = [kind for u, kind, _ in events if u == 0]
    assert first[-2:] == [SpeechEventType.FINAL, SpeechEventType.SPEECH_STOPPED], events
    second = [kind for u, kind, _ in events if u == 1]
    assert second == [SpeechEventType.SPEECH_STARTED, SpeechEventType.PARTIAL], events
