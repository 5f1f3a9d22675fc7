"""Streaming Whisper (faster-whisper, CTranslate2 int8 on CPU) for the LOCAL provider.

Whisper is not incremental, so streaming is built from three pieces:

* Silero VAD cuts the stream into utterances (:mod:`transcribe_gateway.audio.vad`);
* while an utterance is open, it is re-decoded every ``partial_interval_ms`` for
  ``transcription.partial``, but only when a pool worker is free right now, so
  under load partials are skipped, never queued.  A partial's encoder sees its
  audio and ``SHORT_PADDING_MS`` of the padding, not the whole 30 s window a
  final's does: ~0.12 core-seconds instead of ~0.5;
* at the endpoint the utterance is decoded once more, with beam search and
  word timestamps, for ``transcription.completed``.  That decode starts early,
  *speculatively*, once ``SPECULATE_AFTER_MS`` of the endpointing silence has
  been heard and a worker is free: if the silence then reaches the endpoint
  (no speech resumed), the final is ready when the VAD ends the utterance,
  instead of ~0.45 s after it.  If speech resumes, the guess is abandoned.
  The final is decoded in context (``whisper_engine.in_context``): after the
  session's recent speech and before a repeat of the utterance, in one window,
  so it reads nearly as the whole recording decoded at once would; but an
  utterance whose partial says a word or phrase twice in a row ("No, no")
  is decoded alone on the whole window at once, as it would be after its two
  copies disagreed.  A final with the session's earlier speech in its window
  takes a short window too, as every final of a call does: it reads as well
  there at 0.6x the decode.
  A final with nothing before it keeps the whole window (alone in a short one,
  "ten of clubs" read "ten of close"), unless its stream is real time and
  other decodes wait for a worker (the engine has more to do than workers):
  then half the cost lets an overloaded engine catch up, at a small risk to
  its words (BENCHMARKS.md, *Finals on a short window*).  A client sending
  faster than real time wants the words, not the speed, and the backpressure
  already paces it.
* with ``endpointing_unfinished`` (semantic endpointing), that guess also
  decides when the utterance ends: at ``endpointing`` if its text ends a
  sentence, else only after the longer silence, so a caller who pauses
  mid-sentence gets one final with the whole sentence's context
  (:func:`ends_sentence`).

A decode nobody waits for any more (that guess; a partial once its utterance's
final is under way) stops after Whisper's encoder, and a decode that is the only
one under way encodes on every core.

This module is the stream; the model and how one utterance is decoded (alone, in
context, on a short window) are :mod:`~transcribe_gateway.providers.whisper_engine`'s,
where the encoder runs :mod:`~transcribe_gateway.providers.whisper_encoder`'s, and
how a final's two copies are read :mod:`~transcribe_gateway.providers.whisper_copies`'s.

Finals of one stream are decoded in order by the stream's own task; their queue
is short and bounded, so a client sending faster than real time is slowed to
the decode speed (backpressure through the socket) instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from transcribe_gateway.audio.buffer import AudioBuffer
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import FRAME, SAMPLE_RATE, TRAILING_MS, VadEvent
from transcribe_gateway.providers.base import (
    STT,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)
from transcribe_gateway.providers.local_common import (
    RealTimeClock,
    hear,
    lookback_samples,
    to_ms,
    voice_activity,
)
from transcribe_gateway.providers.pool import DecodePool
from transcribe_gateway.providers.whisper_copies import repeats_itself
from transcribe_gateway.providers.whisper_engine import Transcript, WhisperEngine

T = TypeVar("T")

FINAL_QUEUE: Final = 4
"""Utterances waiting for their final decode before ``push_audio`` waits."""
MIN_PARTIAL_SAMPLES: Final = SAMPLE_RATE // 2
SPECULATE_AFTER_MS: Final = TRAILING_MS
"""Silence heard before the final decode starts speculatively (capped at half the
endpointing): as soon as the utterance's audio, with its trailing silence, is in."""
CONTEXT_MS: Final = 5_000
"""A final is decoded after the session's speech of up to this long before it.  In a
long session (a call) every final has that much earlier speech to decode first: 10 s
cost 0.08-0.13 s more per final than 5 s and took a call's final p95 from 0.42 to
0.66 s after the endpoint, for no better WER (BENCHMARKS.md, *A call: one long
session*)."""


def ends_sentence(text: str) -> bool:
    """Whether Whisper's text reads as a finished sentence (its punctuation is the
    judge: ``.``, ``?`` or ``!``, but not a trailing ``...``, which tiny.en writes
    for speech it hears break off)."""
    text = text.rstrip().rstrip("\"')]\u201d\u2019")
    return text.endswith((".", "?", "!")) and not text.endswith(("...", "\u2026"))


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(slots=True)
class _Decode(Generic[T]):
    """A decode under way in the pool, and the flag that stops it early."""

    task: asyncio.Task[T]
    abandoned: threading.Event

    def abandon(self) -> None:
        """The result is not wanted: stop after the encoder, and stop waiting."""
        self.abandoned.set()
        self.task.cancel()


@dataclass(slots=True)
class _Final:
    """An utterance waiting for its final, maybe with a decode already under way."""

    utterance: int
    start: int
    end: int
    audio: Samples
    context: Samples | None
    ended_at: float
    """``time.monotonic()`` when the utterance was ended (its endpoint)."""
    real_time: bool
    """Whether the stream sent it in real time (its lateness is the pool's)."""
    with_repeat: bool
    """Whether its final may be decoded before a repeat of it (:meth:`_with_repeat`)."""
    early: _Decode[Transcript | None] | None = None


def whisper_language(language: str) -> str | None:
    """BCP-47 to Whisper's code: ``en-US`` -> ``en``; ``multi`` -> auto-detect."""
    return None if language == "multi" else language.split("-")[0].lower()


class WhisperStream(RecognizeStream):
    """VAD-segmented streaming over a :class:`WhisperEngine`."""

    def __init__(
        self,
        stt: STT,
        options: StreamOptions,
        engine: WhisperEngine,
        pool: DecodePool,
        *,
        beam_size: int,
        partial_interval_ms: int,
        max_utterance_ms: int,
        final_context: bool,
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(stt, options)
        self._engine = engine
        self._pool = pool
        self._beam = beam_size
        self._partial_every = partial_interval_ms * SAMPLE_RATE // 1000
        self._on_close_cb = on_close
        self._language = whisper_language(options.language)
        unfinished = options.endpointing_unfinished_ms
        self._semantic = unfinished is not None and unfinished > options.endpointing_ms
        """Semantic endpointing: the VAD waits for the longer silence, and an
        utterance whose text ends a sentence is ended sooner (:meth:`_boundaries`)."""
        self._activity = voice_activity(
            options, max_utterance_ms, endpointing_ms=unfinished if self._semantic else None
        )
        # A prompt (keyterms) is context the client chose, and the audio context
        # outweighs it: cards-002 prompted "clubs" reads "Queen of clubs" alone,
        # "Queen of Cloves" in context. So prompted sessions decode finals alone.
        contextual = final_context and not options.prompt
        self._history = CONTEXT_MS * SAMPLE_RATE // 1000 if contextual else 0
        """Audio kept before the open utterance, for finals decoded in context."""
        self._starts: deque[int] = deque()
        """Where the utterances of the last ``_history`` samples started."""
        self._keep = max(self._history, lookback_samples(options, 1000))
        self._audio = AudioBuffer()
        self._utterance = -1
        self._utt_start = 0
        self._last_partial_at = 0
        self._partial_text = ""
        self._partial: _Decode[None] | None = None
        self._speculate_after = min(SPECULATE_AFTER_MS, options.endpointing_ms // 2)
        self._early: tuple[int, int, _Decode[Transcript | None]] | None = None
        """(utterance, end sample, decode) of the speculative final under way."""
        self._finals: asyncio.Queue[_Final | None] = asyncio.Queue(FINAL_QUEUE)
        self._clock = RealTimeClock()
        self.early_finals = 0
        """Finals that came from a speculative decode (for benchmarks and tests)."""

    # -- input side (event loop) ------------------------------------------------

    def _take_audio(self, samples: Samples) -> bool:
        # Each VAD frame the chunk completes can start one utterance (an event)
        # and end one (a final job): with room for that many, nothing can wait,
        # so the chunk is taken here, without a task (the usual 20 ms chunk;
        # chunks of FINAL_QUEUE frames, 128 ms, or more always take the task path,
        # which at their few messages a second costs little).
        bound = len(samples) // FRAME + 1 + self._semantic  # + an end of semantic endpointing
        if self._event_room() < bound or FINAL_QUEUE - self._finals.qsize() < bound:
            return False
        if not self._activity.inline(samples):
            return False  # heard off the loop, in _on_audio
        self._clock.audio_arrived()
        self._audio.append(samples)
        for event in self._boundaries(self._activity.process(samples)):
            if event.kind == "start":
                self._emit_nowait(self._begin_utterance(event.sample))
            else:
                self._finals.put_nowait(self._end_utterance(event.sample))
        self._after_audio()
        return True

    async def _on_audio(self, samples: Samples) -> None:
        self._clock.audio_arrived()
        heard = await hear(self._activity, self._audio, samples)
        self._audio.append(samples)
        for event in self._boundaries(heard):
            if event.kind == "start":
                await self._emit(self._begin_utterance(event.sample))
            else:
                # Waits while FINAL_QUEUE utterances are pending: the backpressure.
                await self._finals.put(self._end_utterance(event.sample))
        self._after_audio()

    def _in_real_time(self) -> bool:
        """Whether the client sends no faster than real time (a caller, not a file)."""
        # The buffer's end counts every sample taken (clearing it keeps the count).
        return self._clock.in_real_time(self._audio.end)

    def _boundaries(self, events: list[VadEvent]) -> list[VadEvent]:
        """The VAD's boundaries for a chunk (``events``), and semantic endpointing's."""
        if events or not self._semantic:
            return events
        # Semantic endpointing: past the usual endpointing silence, a guess whose
        # text ends a sentence ends the utterance now; one that does not holds it
        # until the VAD's longer silence (or speech resumes). No guess (no worker
        # was free) or a failed one: end it now, as plain endpointing would.
        endpointer = self._activity.endpointer
        end = endpointer.pending_end
        if end is None or endpointer.silence_ms < self._options.endpointing_ms:
            return events
        guess = self._guess_at(end)
        if guess is not None:
            task = guess.task
            if not task.done():
                return events  # its text decides: ask again at the next chunk
            result = None if task.cancelled() or task.exception() else task.result()
            if result is not None and result.text and not ends_sentence(result.text):
                return events
        event = endpointer.end_now()
        return [event] if event is not None else events

    def _after_audio(self) -> None:
        if self._activity.in_speech:
            if self._activity.endpointer.pending_end is None:
                self._maybe_partial()
            else:
                self._maybe_speculate()
        else:
            self._audio.discard_before(self._audio.end - self._keep)

    def _begin_utterance(self, sample: int) -> SpeechEvent:
        self._utterance += 1
        self._utt_start = max(sample, self._audio.start)
        if self._history:
            while self._starts and self._starts[0] < self._utt_start - self._history:
                self._starts.popleft()
            self._starts.append(self._utt_start)
        # The first partial is due as soon as there is MIN_PARTIAL_SAMPLES of speech.
        self._last_partial_at = self._utt_start + MIN_PARTIAL_SAMPLES - self._partial_every
        self._partial_text = ""
        return SpeechEvent(SpeechEventType.SPEECH_STARTED, self._utterance, start_ms=to_ms(sample))

    def _end_utterance(self, sample: int) -> _Final:
        job = _Final(
            self._utterance,
            self._utt_start,
            sample,
            self._audio.slice(self._utt_start, sample),
            self._context(),
            time.monotonic(),
            self._in_real_time(),
            self._with_repeat(),
        )
        job.early = self._guess_at(sample)  # if any, the silence held: it is the final
        if job.early is None and self._early is not None:
            self._early[2].abandon()
        self._early = None
        if self._partial is not None:
            self._partial.abandon()  # its result would be dropped: the utterance is over
        self._audio.discard_before(sample - self._history)
        return job

    def _maybe_speculate(self) -> None:
        endpointer = self._activity.endpointer
        end = endpointer.pending_end
        if end is None or endpointer.silence_ms < self._speculate_after or end > self._audio.end:
            return
        if self._guess_at(end) is not None:
            return  # already decoding exactly this
        if self._early is not None:
            self._early[2].abandon()  # speech resumed since: a new end
            self._early = None
        if self._pool.busy >= self._pool.workers:
            return  # never delay another session's work for a guess
        abandoned = threading.Event()
        audio = self._audio.slice(self._utt_start, end)
        decoder = self._final_decoder(
            audio,
            self._context(),
            self._utt_start,
            abandoned,
            self._in_real_time(),
            self._with_repeat(),
        )
        task = asyncio.get_running_loop().create_task(
            self._pool.try_run(decoder),
            name="whisper-early-final",
        )
        self._early = (self._utterance, end, _Decode(task, abandoned))
        if self._partial is not None:
            # The final is on its way: a partial still encoding gives it the cores.
            self._partial.abandon()

    def _guess_at(self, end: int) -> _Decode[Transcript | None] | None:
        """The speculative final under way for the open utterance ending at ``end``."""
        early = self._early
        return early[2] if early is not None and early[:2] == (self._utterance, end) else None

    def _context(self) -> Samples | None:
        """The open utterance's context for its final: the audio since the first
        utterance that started within ``CONTEXT_MS`` before it (None: decode alone)."""
        if not self._history:
            return None
        return self._audio.slice(self._starts[0] if self._starts else 0, self._utt_start)

    def _with_repeat(self) -> bool:
        """Whether the open utterance's final may be decoded before a repeat of it:
        not if its partial says a word or a phrase twice in a row ("No, no"), as
        the copies of such an utterance disagree (:func:`repeats_itself`)."""
        return not repeats_itself(self._partial_text)

    def _final_decoder(
        self,
        audio: Samples,
        context: Samples | None,
        start: int,
        abandoned: threading.Event,
        real_time: bool,
        with_repeat: bool,
    ) -> Callable[[], Transcript]:
        """The final's decode; ``real_time``: its client streamed it in real time
        (:meth:`_in_real_time` when the decode was asked for: as the speculative
        guess started, or as the utterance ended)."""
        # Earlier speech in the window: the short window reads as well there (and
        # a call's finals all have it); alone, a lone utterance may not.
        after_speech = context is not None and len(context) > 0
        return lambda: self._engine.transcribe(
            audio,
            final=True,
            prompt=self._options.prompt,
            language=self._language,
            beam_size=self._beam,
            offset_ms=to_ms(start),
            context=context,
            with_repeat=with_repeat,
            abandoned=abandoned,
            # Read as the decode starts (on its worker; a dict's len is safe to
            # read across threads): decodes waiting behind this one mean the
            # engine has more to do than workers; half the cost helps it catch up.
            short_window=after_speech or (real_time and self._pool.waiting > 0),
        )

    def _maybe_partial(self) -> None:
        if self._partial is not None and not self._partial.task.done():
            return
        now = self._audio.end
        if now - self._last_partial_at < self._partial_every:
            return
        if now - self._utt_start < MIN_PARTIAL_SAMPLES or self._pool.busy >= self._pool.workers:
            return
        self._last_partial_at = now
        audio = self._audio.slice(self._utt_start, now)
        abandoned = threading.Event()
        task = asyncio.get_running_loop().create_task(
            self._decode_partial(self._utterance, audio, abandoned), name="whisper-partial"
        )
        self._partial = _Decode(task, abandoned)

    async def _decode_partial(
        self, utterance: int, audio: Samples, abandoned: threading.Event
    ) -> None:
        result = await self._pool.try_run(
            lambda: self._engine.transcribe(
                audio,
                final=False,
                prompt=self._options.prompt,
                language=self._language,
                abandoned=abandoned,
            )
        )
        # Drop a partial that lost the race with its utterance's final.
        if result is None or utterance != self._utterance or not self._activity.in_speech:
            return
        if result.text and result.text != self._partial_text:
            self._partial_text = result.text
            await self._emit(SpeechEvent(SpeechEventType.PARTIAL, utterance, text=result.text))

    def progress_at(self) -> float:
        # This session's last decode may wait behind others' in the shared pool.
        return self._pool.finished_at

    async def _on_end_input(self) -> None:
        if self._activity.in_speech:
            # Trailing speech with no silence after it: finalize up to the last sample.
            self._activity.endpointer.in_speech = False
            await self._finals.put(self._end_utterance(self._audio.end))
        self._audio.clear()
        await self._finals.put(None)

    # -- output side ------------------------------------------------------------

    async def _run(self) -> None:
        while (job := await self._finals.get()) is not None:
            utterance, start, end = job.utterance, job.start, job.end
            result = None
            if job.early is not None:
                try:
                    result = await job.early.task  # None: no worker was free, decode now
                except asyncio.CancelledError:
                    if _being_cancelled():
                        job.early.abandoned.set()  # the session is closing
                        raise
                self.early_finals += result is not None
            if result is None:
                abandoned = threading.Event()
                try:
                    result = await self._pool.run(
                        self._final_decoder(
                            job.audio, job.context, start, abandoned, job.real_time, job.with_repeat
                        )
                    )
                except asyncio.CancelledError:
                    abandoned.set()  # the session is closing
                    raise
            if job.real_time:
                # What callers feel of the engine's load: admission reads it.
                self._pool.final_delivered(time.monotonic() - job.ended_at)
            if result.text:
                await self._emit(
                    SpeechEvent(
                        SpeechEventType.FINAL,
                        utterance,
                        text=result.text,
                        start_ms=to_ms(start),
                        end_ms=to_ms(end),
                        words=result.words,
                    )
                )
            await self._emit(
                SpeechEvent(SpeechEventType.SPEECH_STOPPED, utterance, end_ms=to_ms(end))
            )

    async def _on_close(self) -> None:
        decodes: list[_Decode[Any] | None] = [
            self._partial,
            self._early[2] if self._early else None,
        ]
        while not self._finals.empty():
            job = self._finals.get_nowait()
            decodes.append(job.early if job is not None else None)
        try:
            for decode in decodes:
                if decode is not None:
                    decode.abandon()
                    # Nobody wants its result, nor its error (a partial's is seen by
                    # nobody else): a failed decode must not fail the close.
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await decode.task
            self._audio.clear()
        finally:
            self._on_close_cb()  # the session's admission slot, whatever happened
