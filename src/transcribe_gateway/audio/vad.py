"""Voice activity: Silero VAD (the ONNX model shipped in faster-whisper's wheel) run
frame by frame, and an endpointer that turns speech probabilities into utterances.

Silero runs at about 0.002x real time, so a session runs it inline on the event
loop for a chunk of up to :data:`OFF_LOOP_MS`: a thread hop per 20 ms chunk would
cost more than the model itself.  A longer chunk (a client sending a file, or
silence, faster than real time, which the protocol allows) is heard on a worker
thread instead (:meth:`VoiceActivity.process_async`; onnxruntime releases the
GIL): 128 KiB of 8 kHz mu-law is 16 s of audio, ~60 ms of Silero for a phone
line, and inline one client sending those back to back stalled every session
of the server for seconds.
faster-whisper's own ``get_speech_timestamps`` works on whole files only, which
is why the streaming state (LSTM state and 64-sample context) is kept here.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from transcribe_gateway.audio.decode import Samples

SAMPLE_RATE: Final = 16000
FRAME: Final = 512
"""Samples per Silero frame at 16 kHz (32 ms)."""
FRAME_MS: Final = FRAME * 1000 // SAMPLE_RATE
TRAILING_MS: Final = 96
"""Silence an utterance keeps after its last voiced frame (three frames), for a
soft final consonant Silero scores as silence (at 64 ms, "clubs" became
"clothes").  Short, so a final's decode can start early in the endpointing
silence: 150 ms (half the prefix padding, before) delayed finals by 54 ms more
for no accuracy on the shared audio (BENCHMARKS.md, "Finals sooner")."""
_CONTEXT: Final = 64
NARROWBAND_RATE: Final = 8000
"""Client rates at or below this are a phone line's band (see :class:`NarrowbandVad`)."""
OFF_LOOP_MS: Final = 200
"""A chunk of more audio than this is heard on a worker thread, not on the event loop
(under 1 ms of Silero inline, twice Silero at 8 kHz)."""
OFF_LOOP_SAMPLES: Final = OFF_LOOP_MS * SAMPLE_RATE // 1000
INLINE_RUN_MS: Final = 1000
"""Audio a stream hears on the event loop before the loop has run again (a few ms of
Silero); past it a chunk waits for the loop (:meth:`VoiceActivity.process_async`).
A caller's 20 ms chunks, each in its own turn of the loop, never come near it; a
client sending short chunks back to back held the loop for seconds (the gateway
takes the messages it reads at once, or holds behind a push, one after the other)."""
INLINE_RUN_SAMPLES: Final = INLINE_RUN_MS * SAMPLE_RATE // 1000
VAD_THREADS: Final = 2
"""Threads hearing long chunks, for every session together.  Each stream has one
chunk there at a time (its client waits meanwhile); two threads hear some 600x
real time (300x from a phone line), and a flood of files takes no more than two
of the cores the decoders share (on the loop, before, it took one)."""


@functools.cache
def _silero_session() -> Any:
    """Load the ONNX model once per process (sessions share it; ``run`` is thread-safe)."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


@functools.cache
def _vad_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(VAD_THREADS, thread_name_prefix="vad")


def load_vad_model() -> None:
    """Load Silero now (at server start) rather than on the first session."""
    _silero_session()


class SileroVad:
    """Speech probability per 32 ms frame of a 16 kHz stream, keeping state across calls."""

    def __init__(self) -> None:
        self._session = _silero_session()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: Samples) -> npt.NDArray[np.float32]:
        """Feed samples; return one probability per completed frame."""
        audio = np.concatenate([self._pending, samples.astype(np.float32) / 32768.0])
        n = len(audio) // FRAME
        self._pending = audio[n * FRAME :]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        frames = audio[: n * FRAME].reshape(n, FRAME)
        contexts = np.empty((n, _CONTEXT), dtype=np.float32)
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -_CONTEXT:]
        self._context = frames[-1, -_CONTEXT:].copy()
        batch = np.concatenate([contexts, frames], axis=1)
        probs, self._h, self._c = self._session.run(
            None, {"input": batch, "h": self._h, "c": self._c}
        )
        return np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass(frozen=True, slots=True)
class VadEvent:
    """Speech began or ended at ``sample`` (index in the stream, 16 kHz)."""

    kind: str  # "start" | "end"
    sample: int


class Endpointer:
    """Hysteresis over frame probabilities: when an utterance starts and ends.

    Args:
        threshold: probability that counts as speech.
        min_speech_ms: voiced time needed before speech is declared.
        endpointing_ms: silence that ends an utterance.
        prefix_padding_ms: how far before the first voiced frame the utterance starts.
        max_utterance_ms: an utterance longer than this is cut (Whisper sees 30 s at most).
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        min_speech_ms: int = 100,
        endpointing_ms: int = 500,
        prefix_padding_ms: int = 300,
        max_utterance_ms: int = 25000,
    ) -> None:
        self._on = threshold
        self._off = max(threshold - 0.15, 0.01)  # hysteresis, as Silero's own helper does
        self._min_speech = max(1, -(-min_speech_ms // FRAME_MS))
        self._min_silence = max(1, -(-endpointing_ms // FRAME_MS))
        self._pad = prefix_padding_ms * SAMPLE_RATE // 1000
        # TRAILING_MS past the last voiced frame, never more than half the
        # prefix padding nor past the frame that completes the endpointing.
        self._trailing = min(
            TRAILING_MS * SAMPLE_RATE // 1000, self._pad // 2, self._min_silence * FRAME
        )
        self._max_len = max_utterance_ms * SAMPLE_RATE // 1000
        self._frame = 0  # index of the next frame
        self.in_speech = False
        self._voiced_run = 0
        self._silent_run = 0
        self._start = 0
        self._last_voiced_end = 0
        self._last_end = 0  # a new utterance never starts before the previous one ended

    def process(self, probs: npt.NDArray[np.float32]) -> list[VadEvent]:
        """Feed frame probabilities (in order); return the boundaries they reveal."""
        events: list[VadEvent] = []
        for p in probs.tolist():
            start_sample = self._frame * FRAME
            self._frame += 1
            if not self.in_speech:
                if p >= self._on:
                    self._voiced_run += 1
                    if self._voiced_run >= self._min_speech:
                        first = start_sample - (self._voiced_run - 1) * FRAME
                        self._begin(max(self._last_end, first - self._pad), events)
                else:
                    self._voiced_run = 0
                continue
            if p >= self._off:
                self._silent_run = 0
                self._last_voiced_end = start_sample + FRAME
            else:
                self._silent_run += 1
                if self._silent_run >= self._min_silence:
                    self._finish(self._end_after_silence(), events)
                    continue
            if start_sample + FRAME - self._start >= self._max_len:
                self._finish(start_sample + FRAME, events)
                self._begin(start_sample + FRAME, events)
        return events

    def _end_after_silence(self) -> int:
        return self._last_voiced_end + self._trailing

    @property
    def trailing_ms(self) -> int:
        """How far past the last voiced frame an utterance's end (``end_ms``) is dated."""
        return self._trailing * 1000 // SAMPLE_RATE

    @property
    def silence_ms(self) -> int:
        """Silence heard since the last voiced frame of the open utterance (0 if none)."""
        return self._silent_run * FRAME_MS if self.in_speech else 0

    @property
    def pending_end(self) -> int | None:
        """Where the open utterance ends if the silence now heard reaches the endpoint.

        ``None`` while speech is going on.  Lets an engine start its final decode
        early, during the endpointing silence, and keep it if no speech resumes.
        """
        if not self.in_speech or not self._silent_run:
            return None
        return self._end_after_silence()

    def end_now(self) -> VadEvent | None:
        """End the open utterance at :attr:`pending_end`, before the endpointing
        silence is complete (an engine that knows the speech is finished, see
        ``endpointing_unfinished``); ``None`` when there is no pending end."""
        end = self.pending_end
        if end is None:
            return None
        events: list[VadEvent] = []
        # Never past the audio heard: the trailing margin is capped by the long
        # endpointing's silence, and this comes sooner (after the short one).
        self._finish(min(end, self._frame * FRAME), events)
        return events[0]

    def _begin(self, sample: int, events: list[VadEvent]) -> None:
        self.in_speech = True
        self._voiced_run = 0
        self._silent_run = 0
        self._start = sample
        self._last_voiced_end = self._frame * FRAME
        events.append(VadEvent("start", sample))

    def _finish(self, sample: int, events: list[VadEvent]) -> None:
        self.in_speech = False
        self._last_end = sample
        self._voiced_run = 0
        self._silent_run = 0
        events.append(VadEvent("end", sample))


class Widen:
    """Audio resampled from a phone line (<= 8 kHz) to 16 kHz, made audible to Silero.

    A clean resampler leaves nothing above 4 kHz, and Silero's 16 kHz model
    then misses quiet speech: on the shared recordings through 8 kHz mu-law it
    missed 7.9% of the speech it finds at 16 kHz, whole phrases at onsets
    ("eight of spades", "ask").  Taking every other sample (the 8 kHz signal)
    and re-upsampling it by linear interpolation leaves a faint mirror image of
    the voice band above 4 kHz, as cheap upsamplers do, and Silero hears
    speech there again.  Written by hand: library resamplers exist to remove
    exactly that image; this is two numpy slices and one sample of state.
    """

    def __init__(self) -> None:
        self._parity = 0  # index of the next sample, mod 2
        self._last = 0  # the previous even-indexed sample

    def process(self, samples: Samples) -> Samples:
        """One chunk in; over the stream, as many samples out (one more at most)."""
        even = samples[self._parity :: 2].astype(np.int32)
        self._parity = (self._parity + len(samples)) % 2
        if not len(even):
            return np.zeros(0, dtype=np.int16)
        out = np.empty(2 * len(even), dtype=np.int16)
        out[1::2] = even
        out[0] = (self._last + even[0]) // 2
        out[2::2] = (even[:-1] + even[1:]) // 2
        self._last = int(even[-1])
        return out


class NarrowbandVad:
    """Speech probability for 16 kHz audio resampled from 8 kHz or less.

    Each frame's probability is the larger of Silero on the audio as it is and
    on the :class:`Widen`-ed audio: either one hearing speech is enough.  On
    the shared recordings through 8 kHz mu-law, against the speech Silero
    finds at 16 kHz, the plain audio missed 7.9%, the widened 3.1%, both 2.9%;
    on synthesized speech 1.0%, 1.1% and 0.7% (``bench/narrowband_vad.py``).
    Twice Silero's cost (~0.004x real time), for phone sessions only.
    """

    def __init__(self) -> None:
        self._plain = SileroVad()
        self._wide = SileroVad()
        self._widen = Widen()
        self._held = (np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32))

    def process(self, samples: Samples) -> npt.NDArray[np.float32]:
        """Feed samples; return one probability per frame both models completed."""
        plain = np.concatenate([self._held[0], self._plain.process(samples)])
        wide = np.concatenate([self._held[1], self._wide.process(self._widen.process(samples))])
        n = min(len(plain), len(wide))  # the widened audio may lag by a sample
        self._held = (plain[n:], wide[n:])
        both: npt.NDArray[np.float32] = np.maximum(plain[:n], wide[:n])
        return both


class VoiceActivity:
    """Silero + endpointer: feed 16 kHz samples, get utterance boundaries.

    ``narrowband``: the audio was resampled from 8 kHz or less (see :class:`NarrowbandVad`).
    One chunk at a time: a stream feeds the next once the previous one's boundaries
    are back (:meth:`process_async` too; the gateway holds a client's later
    messages while a push waits).
    """

    def __init__(self, endpointer: Endpointer, *, narrowband: bool = False) -> None:
        self._vad = NarrowbandVad() if narrowband else SileroVad()
        self.endpointer = endpointer
        self.heard = 0
        """Samples handed to Silero so far (a chunk on a worker thread included)."""
        self._off_loop: asyncio.Future[npt.NDArray[np.float32]] | None = None
        """Silero on a long chunk, on a worker thread, not yet given to the endpointer."""
        self._unreported: list[VadEvent] = []
        """Boundaries found for a chunk whose caller was cancelled: the next call's."""
        self._inline_run = 0
        """Samples heard on the event loop since it last ran other work."""
        self._reset_due = False

    @property
    def in_speech(self) -> bool:
        return self.endpointer.in_speech

    def inline(self, samples: Samples) -> bool:
        """Whether :meth:`process` may take ``samples`` now, on the event loop: a short
        chunk, not past :data:`INLINE_RUN_MS` since the loop last ran, and no earlier
        one still being heard on a worker thread."""
        if len(samples) > OFF_LOOP_SAMPLES or self._inline_run + len(samples) > INLINE_RUN_SAMPLES:
            return False
        return self._off_loop is None or self._off_loop.done()

    def process(self, samples: Samples) -> list[VadEvent]:
        """Boundaries the chunk reveals, heard here (only where :meth:`inline` says so)."""
        if self._off_loop is not None:  # done (inline() was asked): its frames come first
            self._unreported += self.endpointer.process(self._off_loop.result())
            self._off_loop = None
        return self._report(self._hear_inline(samples))

    async def process_async(self, samples: Samples) -> list[VadEvent]:
        """:meth:`process` for any chunk, for a push that may wait: a chunk over
        :data:`OFF_LOOP_SAMPLES` is heard on a worker thread, so the event loop
        serves every other session meanwhile; a shorter one once the loop has run
        (the gateway takes the messages held behind a push one after the other: a
        client whose pushes never waited would hold the loop for as long as it sends).

        Cancelled, the chunk was taken if :attr:`heard` counts it: the thread
        finishes it all the same (Silero's state moves on with it), and its
        boundaries come with the next chunk's.
        """
        await self._catch_up()
        if len(samples) <= OFF_LOOP_SAMPLES:
            await asyncio.sleep(0)
            return self._report(self._hear_inline(samples))
        loop = asyncio.get_running_loop()
        self._off_loop = loop.run_in_executor(_vad_threads(), self._vad.process, samples)
        self.heard += len(samples)
        await self._catch_up()
        return self._report([])

    def _hear_inline(self, samples: Samples) -> list[VadEvent]:
        if not self._reset_due:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # offline use (benchmarks): no loop to keep free
                loop = None
            if loop is not None:
                loop.call_soon(self._loop_ran)  # the loop's next turn: it ran other work
                self._reset_due = True
        self._inline_run += len(samples)
        self.heard += len(samples)
        return self.endpointer.process(self._vad.process(samples))

    def _loop_ran(self) -> None:
        self._inline_run = 0
        self._reset_due = False

    async def _catch_up(self) -> None:
        """Give the endpointer the frames of the chunk heard on a worker thread, if any."""
        if self._off_loop is not None:
            probs = await asyncio.shield(self._off_loop)
            self._off_loop = None
            self._unreported += self.endpointer.process(probs)

    def _report(self, events: list[VadEvent]) -> list[VadEvent]:
        events, self._unreported = self._unreported + events, []
        return events
