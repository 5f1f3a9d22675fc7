"""The Whisper stream in process: segmentation, speculative finals, trailing speech."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.conftest import SHARED_AUDIO
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.config import Settings
from transcribe_gateway.providers.base import SpeechEvent, SpeechEventType, StreamOptions
from transcribe_gateway.providers.local import LocalSTT
from transcribe_gateway.providers.local_whisper import WhisperStream


@pytest.fixture(scope="module")
async def stt() -> LocalSTT:
    engine = LocalSTT(Settings())
    await engine.start()
    return engine


@dataclass
class Run:
    stream: WhisperStream
    events: list[SpeechEvent] = field(default_factory=list)
    waited: int = 0
    """Chunks ``push_audio_nowait`` refused, pushed with ``push_audio`` instead."""


async def run(stt: LocalSTT, audio: np.ndarray, *, live: bool = True, **options: int) -> Run:
    """Push ``audio`` in 20 ms chunks the way the gateway does: at once when the
    stream takes them, else awaited.  ``live``: yield between chunks, as a live
    stream would (the decode tasks get to run); otherwise flood."""
    stream = await stt.open_stream(StreamOptions(model="whisper-tiny.en", **options))
    assert isinstance(stream, WhisperStream)
    result = Run(stream)

    async def collect() -> None:
        async for event in stream:
            result.events.append(event)

    collector = asyncio.create_task(collect())
    for i in range(0, len(audio), 320):
        if not stream.push_audio_nowait(audio[i : i + 320]):
            result.waited += 1
            await stream.push_audio(audio[i : i + 320])
        if live:
            await asyncio.sleep(0)
    await stream.end_input()
    await asyncio.wait_for(collector, 60)
    await stream.aclose()
    return result


def finals(events: list[SpeechEvent]) -> list[SpeechEvent]:
    return [e for e in events if e.type is SpeechEventType.FINAL]


async def test_final_is_decoded_during_the_endpointing_silence(stt: LocalSTT) -> None:
    audio = np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), np.zeros(16000, np.int16)])
    result = await run(stt, audio)
    (final,) = finals(result.events)
    assert normalize(final.text) == "go forward ten meters"
    assert result.stream.early_finals == 1  # the speculative decode became the final
    assert result.waited == 0  # every chunk was taken at once, without a task
    assert stt.active["whisper"] == 0


async def test_a_flood_of_utterances_waits_for_the_final_queue(stt: LocalSTT) -> None:
    # Six utterances pushed without yielding: the stream's task cannot decode
    # meanwhile, so after FINAL_QUEUE pending finals the stream stops taking
    # chunks at once, and push_audio waits; every utterance is still final.
    phrase = np.concatenate([read_audio(SHARED_AUDIO / "goforward.raw"), np.zeros(16000, np.int16)])
    result = await run(stt, np.tile(phrase, 6), live=False)
    texts = [normalize(f.text) for f in finals(result.events)]
    assert texts == ["go forward ten meters"] * 6, texts
    assert [f.utterance for f in finals(result.events)] == list(range(6))
    assert result.waited >= 1


async def test_speculation_is_dropped_when_speech_resumes(stt: LocalSTT) -> None:
    # Two phrases 350 ms apart: longer than the speculation point, shorter than
    # the 500 ms endpointing, so they are one utterance and the guess is wrong.
    words = read_audio(SHARED_AUDIO / "goforward.raw")
    gap = np.zeros(int(0.35 * 16000), np.int16)
    cards = read_audio(SHARED_AUDIO / "cards-001.wav")
    audio = np.concatenate([words[: int(2.35 * 16000)], gap, cards, np.zeros(16000, np.int16)])
    result = await run(stt, audio)
    stream, events = result.stream, result.events
    text = normalize(" ".join(f.text for f in finals(events)))
    assert text.startswith("go forward ten meters ten of")  # "clubs" is often heard "close"
    starts = [e for e in events if e.type is SpeechEventType.SPEECH_STARTED]
    assert len(finals(events)) == len(starts)  # the dropped guess was never emitted
    if len(starts) == 1:  # one utterance: its final covers both phrases
        assert finals(events)[0].end_ms > 2350 + 350
        assert stream.early_finals <= 1


async def test_trailing_speech_is_finalized_at_end_of_input(stt: LocalSTT) -> None:
    audio = read_audio(SHARED_AUDIO / "goforward.raw")[: int(2.35 * 16000)]
    events = (await run(stt, audio)).events
    assert normalize(" ".join(f.text for f in finals(events))) == "go forward ten meters"
    kinds = [e.type for e in events if e.type is not SpeechEventType.PARTIAL]
    assert kinds == [
        SpeechEventType.SPEECH_STARTED,
        SpeechEventType.FINAL,
        SpeechEventType.SPEECH_STOPPED,
    ]
