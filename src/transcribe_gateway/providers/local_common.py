"""What the embedded engines' streams share: voice activity from the stream options,
whether a client streams in real time, and stream time in milliseconds."""

from __future__ import annotations

import asyncio
import time
from typing import Final

from transcribe_gateway.audio.buffer import AudioBuffer
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import (
    NARROWBAND_RATE,
    SAMPLE_RATE,
    Endpointer,
    VadEvent,
    VoiceActivity,
)
from transcribe_gateway.providers.base import StreamOptions

AHEAD_OF_REAL_TIME_S: Final = 1.0
"""Audio received this far ahead of the wall clock since the stream's first chunk
marks a client sending faster than real time (a file, not a caller)."""


def voice_activity(
    options: StreamOptions, max_utterance_ms: int, *, endpointing_ms: int | None = None
) -> VoiceActivity:
    """Silero VAD with the session's endpointing and VAD settings; ``endpointing_ms``
    overrides the session's (a stream that ends some utterances sooner itself)."""
    return VoiceActivity(
        Endpointer(
            threshold=options.vad_threshold,
            min_speech_ms=options.vad_min_speech_ms,
            endpointing_ms=endpointing_ms or options.endpointing_ms,
            prefix_padding_ms=options.vad_prefix_padding_ms,
            max_utterance_ms=max_utterance_ms,
        ),
        narrowband=options.source_rate <= NARROWBAND_RATE,
    )


def lookback_samples(options: StreamOptions, margin_ms: int) -> int:
    """Audio a stream keeps before an utterance starts: the VAD dates a start back
    by the prefix padding plus the voiced time it needs before deciding (less,
    and the head of an utterance is cut), and ``margin_ms`` more."""
    ms = options.vad_prefix_padding_ms + options.vad_min_speech_ms + margin_ms
    return ms * SAMPLE_RATE // 1000


async def hear(activity: VoiceActivity, audio: AudioBuffer, samples: Samples) -> list[VadEvent]:
    """The chunk's boundaries, by :meth:`VoiceActivity.process_async` (a long chunk on
    a worker thread: the loop serves every other session meanwhile, and this
    client's later messages wait); the caller then adds ``samples`` to ``audio``.

    Cancelled once the VAD took the chunk, ``audio`` takes it here: the VAD hears
    it all the same (its boundaries come with the next chunk's), and they would
    be misplaced in a buffer without it.
    """
    try:
        return await activity.process_async(samples)
    except asyncio.CancelledError:
        if activity.heard > audio.end:
            audio.append(samples)
        raise


def to_ms(sample: int) -> int:
    """A position in the stream, in samples at ``SAMPLE_RATE``, as milliseconds."""
    return sample * 1000 // SAMPLE_RATE


class RealTimeClock:
    """Whether a stream's client sends no faster than real time (a caller, not a
    file): the audio it sent against the wall time since its first chunk.

    A real-time stream's late final is the engine's load, and the streams report
    it to the pool for admission (:meth:`.DecodePool.final_delivered`); a faster
    client is paced by its own backlog, and its finals' lateness is its own.
    """

    def __init__(self) -> None:
        self._first_at: float | None = None

    def audio_arrived(self) -> None:
        """A chunk came in: the first one starts the clock."""
        if self._first_at is None:
            self._first_at = time.monotonic()

    def in_real_time(self, samples: int) -> bool:
        """Whether ``samples`` received so far are no more than real time allows."""
        if self._first_at is None:
            return True
        elapsed = time.monotonic() - self._first_at
        return samples / SAMPLE_RATE <= elapsed + AHEAD_OF_REAL_TIME_S
