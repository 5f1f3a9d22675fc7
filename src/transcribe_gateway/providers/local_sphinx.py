"""Streaming pocketsphinx 5 (model ``pocketsphinx-en-us``) for the LOCAL provider.

How a stream works:

* Silero VAD (the same :class:`~transcribe_gateway.audio.vad.VoiceActivity` as the
  Whisper stream) cuts the stream into utterances, so both LOCAL models report
  ``speech.started``/``speech.stopped`` the same way; an utterance starts
  ``vad_prefix_padding_ms`` before its first voiced frame (pre-roll), so its
  first phone is not lost;
* each stream owns one ``Decoder`` (~0.33 s to create, ~90 MB), reused for all
  its utterances.  It lives in a worker *process* (:class:`SphinxProcesses`), not
  a thread: pocketsphinx holds the GIL while it decodes (measured: a 1 s
  ``process_raw`` call stopped every other Python thread for 1 s), so in a
  thread it would stall the event loop and every session of the server.  Calls
  still take a slot of the shared decode pool, so that the embedded engines
  together keep to one decode per core;
* the audio that arrived since the previous call (at least ``MIN_BATCH_MS``)
  goes to the decoder in one ``process_raw`` call, one call in flight per
  stream (a ``Decoder`` is not thread-safe); when ``hyp()`` changes, that is a
  partial;
* at the endpoint ``end_utt()``; the final comes from a second pass (below) and
  ``seg()`` gives the word times.

``fwdflat`` and ``bestpath`` are off: ``end_utt`` drops from ~280 ms to ~15 ms
(``../shared/ENGINES.md``), and with ``bestpath`` on the words got worse here.
Without ``bestpath`` pocketsphinx has no posterior (every probability reads
1.0), so words carry no confidence (``None``) rather than a meaningless one.

The second pass, and why. The acoustic model wants cepstral mean normalization
(CMN) over the whole utterance; once audio is fed in pieces, pocketsphinx
switches to *live* CMN for good, starting from a prior mean (the model's
``cmninit``, then the running mean) that moves only slowly. Measured on the
shared recordings, whose means are far from that prior, live decoding gave 28-32%
WER on the short commands (``goforward``, ``cards-*``) and 35% on LibriVox with a
fresh decoder, against 4% and 21% when each utterance is normalized with its own
mean; a mean off by 8 (Euclidean, over 13 cepstra) already doubles the command
WER, and consecutive utterances differed by 11 to 35. So at the endpoint the
stream recovers the utterance's own mean from the decoder's live statistics
(:meth:`SphinxDecoder._utterance_mean`), sets it, and decodes the utterance again
in one call. Utterances up to ``RESCORE_MAX_MS`` get this; longer ones (where live
CMN has adapted anyway) keep the incremental result. Cost: the decoding CPU
roughly doubles, and a final comes ~0.1-0.25 x the utterance's length after the
endpoint instead of ~15 ms. Partials keep the live result (they use the previous
utterance's mean as prior, so they improve after the first utterance).

Every event comes from the stream's task, in order: ``SPEECH_STARTED``,
``PARTIAL``\\*, ``FINAL`` (when there is text), ``SPEECH_STOPPED``, one
utterance after the other. A client faster than the decoder waits in
``push_audio`` once ``MAX_BACKLOG_MS`` of audio is undecoded. A real-time
stream tells the shared pool how late each final came after its endpoint, as
Whisper's streams do: admission reads it (:mod:`~transcribe_gateway.providers.pool`).

Keyterms (``session.prompt``, comma separated). pocketsphinx offers keyword
spotting (``add_kws``/``add_keyphrase``), but that search replaces the language
model: it would output the keyterms and nothing else, so it cannot bias a
transcription. Its n-gram model cannot re-weight a word it already knows either
(``NGramModel.add_word`` leaves an existing word's probability as it was). What
works is adding a *new* word: each usable keyterm becomes a dictionary entry
with its dictionary pronunciation (a phrase: its words' pronunciations joined)
and a unigram ``KEYTERM_BOOST`` times the uniform probability; the decoder takes
that path when the audio fits, and the stream writes the keyterm back as its
words. On LibriVox, keyterms from the text brought WER from 21% to 14%
("prudently", "ill-disposed" recovered); unrelated keyterms changed nothing.
This also makes recognizable the ~53,000 dictionary words the language model
lacks (``github``...). A keyterm with a word missing from the CMU dictionary
cannot be used (pocketsphinx has no grapheme-to-phoneme): it is left out, logged,
and listed in :attr:`SphinxStream.ignored_keyterms`; :func:`plan_keyterms` lets a
caller check a prompt beforehand. A hyphenated word missing from the dictionary
is pronounced as its parts. Only the first pronunciation of each word is used
for the boosted path (the plain path keeps all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from transcribe_gateway.audio.buffer import AudioBuffer
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import SAMPLE_RATE, VadEvent
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import (
    STT,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
    WordTiming,
)
from transcribe_gateway.providers.local_common import (
    RealTimeClock,
    hear,
    lookback_samples,
    to_ms,
    voice_activity,
)
from transcribe_gateway.providers.pool import DecodePool

T = TypeVar("T")

log = logging.getLogger(__name__)

MAX_BACKLOG_MS: Final = 3000
"""Undecoded audio a stream may hold before ``push_audio`` waits (backpressure)."""
MIN_BATCH_MS: Final = 100
"""Least audio per incremental decode call (fewer thread hops, at most ~10 partials/s)."""
RESCORE_MAX_MS: Final = 10000
"""Utterances up to this long get their final from a second pass with their own CMN."""
KEYTERM_BOOST: Final = 1000.0
"""Unigram probability of a keyterm, relative to the uniform one (1/vocabulary).

100 helped less, 10,000 started turning "for" into the keyterm "four"."""
MAX_KEYTERMS: Final = 100
"""Keyterms used at most; the rest are ignored (each one enlarges the search)."""

FRAMES_PER_SECOND: Final = 100
"""pocketsphinx's frame rate (10 ms shift)."""
CMN_WINDOW: Final = 500
"""Frames of weight pocketsphinx's live CMN gives its prior mean (``CMN_WIN`` in cmn.h)."""
_FRAME_SHIFT: Final = SAMPLE_RATE // FRAMES_PER_SECOND
_FRAME_WINDOW: Final = 410
"""Samples in one analysis window (25.625 ms at 16 kHz, pocketsphinx's default)."""
_ALIAS: Final = "__keyterm{}__"
_ALIAS_RE: Final = re.compile(r"__keyterm(\d+)__")
_ALTERNATE: Final = re.compile(r"\(\d+\)$")
_STRIP: Final = ',;:!?"()[]{}'


# -- keyterms -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keyterm:
    """A keyterm the decoder can use."""

    text: str
    """As it will appear in transcripts: lower case words separated by spaces."""
    phones: str
    """Pronunciation of the whole term (ARPABET, space separated)."""
    word_phones: tuple[int, ...]
    """Phone count of each word (to share a phrase's time among its words)."""


@dataclass(frozen=True, slots=True)
class KeytermPlan:
    """What a prompt becomes: keyterms used, and those that cannot be."""

    usable: tuple[Keyterm, ...] = ()
    ignored: tuple[str, ...] = ()


def parse_keyterms(prompt: str | None) -> list[str]:
    """Split a comma-separated prompt into distinct, lower-case keyterms."""
    # A dict keeps their order and finds a repeat at once: a prompt may hold
    # tens of thousands of terms (up to max_message_bytes), and a list's search
    # made that quadratic, minutes in a worker process that others share.
    terms: dict[str, None] = {}
    for raw in (prompt or "").split(","):
        words = (w.strip(_STRIP) for w in raw.lower().split())
        term = " ".join(w for w in words if w)
        if term:
            terms.setdefault(term)
    return list(terms)


def plan_keyterms(prompt: str | None, lookup: Callable[[str], str | None]) -> KeytermPlan:
    """Decide which keyterms of ``prompt`` the dictionary can pronounce.

    Args:
        prompt: ``session.prompt``, comma separated keyterms.
        lookup: word -> space-separated phones, or ``None`` when the word is not
            in the dictionary (``Decoder.lookup_word``).

    Returns:
        The usable keyterms (at most :data:`MAX_KEYTERMS`) and the ignored ones
        (a word missing from the dictionary, or over the limit).
    """
    usable: list[Keyterm] = []
    ignored: list[str] = []
    for term in parse_keyterms(prompt):
        if len(usable) >= MAX_KEYTERMS:  # over the limit: not looked up at all
            ignored.append(term)
            continue
        pronounced: list[tuple[str, str]] = []
        for token in term.split():
            found = _pronounce(token, lookup)
            if found is None:
                pronounced = []
                break
            pronounced.extend(found)
        if not pronounced:
            ignored.append(term)
            continue
        text = " ".join(w for w, _ in pronounced)
        if any(k.text == text for k in usable):
            continue
        usable.append(
            Keyterm(
                text,
                " ".join(p for _, p in pronounced),
                tuple(len(p.split()) for _, p in pronounced),
            )
        )
    return KeytermPlan(tuple(usable), tuple(ignored))


def _pronounce(token: str, lookup: Callable[[str], str | None]) -> list[tuple[str, str]] | None:
    """``[(word, phones)]`` for one written word, or ``None`` if it cannot be said."""
    if _is_filler(token):  # "<sil>" and "<s>" are in the dictionary, as silence
        return None
    if not token.isprintable():  # C strings: "a\x00b" was looked up, and heard, as "a"
        return None
    for word in dict.fromkeys((token, token.strip("."))):
        phones = lookup(word) if word else None
        if phones:
            return [(word, phones)]
    parts = [p for p in token.strip(".").split("-") if p]
    if len(parts) < 2:
        return None
    out: list[tuple[str, str]] = []
    for part in parts:
        phones = lookup(part)
        if not phones:
            return None
        out.append((part, phones))
    return out


# -- the decoder (blocking: runs on pool workers, one call at a time) -----------


@dataclass(frozen=True, slots=True)
class Result:
    """A final: text and word times (ms from the start of the utterance's audio)."""

    text: str
    words: tuple[WordTiming, ...]


class SphinxDecoder:
    """One pocketsphinx ``Decoder`` with its keyterms; not thread-safe.

    Args:
        prompt: comma-separated keyterms (see the module docstring), or ``None``.
    """

    def __init__(self, prompt: str | None = None) -> None:
        from pocketsphinx import Decoder

        # loglevel FATAL: pocketsphinx writes INFO/WARN lines to stderr otherwise.
        self._decoder: Any = Decoder(fwdflat=False, bestpath=False, loglevel="FATAL")
        self._in_utt = False
        self._prior: npt.NDArray[np.float64] | None = None
        self.plan = plan_keyterms(prompt, self._decoder.lookup_word)
        """Keyterms used and ignored."""
        if self.plan.usable:
            self._add_keyterms(self.plan.usable)

    def _add_keyterms(self, keyterms: Sequence[Keyterm]) -> None:
        decoder = self._decoder
        lm = decoder.get_lm()
        # The unigram must exist, boosted, before the dictionary gets the word:
        # add_word would otherwise put it in the model at the uniform probability.
        for i in range(len(keyterms)):
            lm.add_word(_ALIAS.format(i), KEYTERM_BOOST)
        for i, term in enumerate(keyterms):
            decoder.add_word(_ALIAS.format(i), term.phones, False)
        # A search over the updated dictionary and model (~0.2 s).
        decoder.add_lm("keyterms", lm)
        decoder.activate_search("keyterms")

    def feed(self, samples: Samples) -> str:
        """Decode more of the current utterance (starting one if needed); its text so far."""
        if not self._in_utt:
            prior = self._decoder.get_cmn()
            # Gives the prior exactly CMN_WINDOW frames of weight again, so that
            # the utterance's own mean can be recovered at its end.
            self._decoder.set_cmn(prior)
            self._prior = _parse_cmn(prior)
            self._decoder.start_utt()
            self._in_utt = True
        self._decoder.process_raw(_pcm(samples), False, False)
        hyp = self._decoder.hyp()
        return self._text(hyp.hypstr.split()) if hyp is not None else ""

    def finish(self, fed: Samples | None = None, length: int = 0) -> Result:
        """End the current utterance; its final text and words (times from its start).

        Args:
            fed: all the audio :meth:`feed` got for this utterance, to decode its
                first ``length`` samples (the utterance; the rest is silence that
                came before the endpoint was known) once more with the
                utterance's own cepstral mean. ``None`` keeps the live result.
            length: samples of ``fed`` to decode again.
        """
        if not self._in_utt:
            return Result("", ())
        self._decoder.end_utt()
        self._in_utt = False
        mean = self._utterance_mean(fed) if fed is not None else None
        if fed is not None and mean is not None:
            self._decoder.set_cmn(mean)
            self._decoder.start_utt()
            try:
                self._decoder.process_raw(_pcm(fed[:length]), False, True)
            finally:
                self._decoder.end_utt()
        words: list[WordTiming] = []
        for seg in self._decoder.seg():
            start_ms = seg.start_frame * 1000 // FRAMES_PER_SECOND
            end_ms = (seg.end_frame + 1) * 1000 // FRAMES_PER_SECOND  # end_frame is inclusive
            words.extend(self._timed_words(str(seg.word), start_ms, end_ms))
        return Result(" ".join(w.word for w in words), tuple(words))

    def _utterance_mean(self, fed: Samples) -> str | None:
        """The cepstral mean of the utterance just decoded live, as ``set_cmn`` wants it.

        Live CMN (pocketsphinx's cmn_live.c) keeps ``sum = CMN_WINDOW * prior +
        sum(frames)`` over ``CMN_WINDOW + frames``, skipping frames of zero
        energy (digital silence), so the utterance's own mean can be solved for.
        Exact up to ~3 s (300 frames); beyond, pocketsphinx rescales its window
        mid-utterance and the result is a close approximation.
        """
        if self._prior is None:
            return None
        counted = self._decoder.n_frames() - _silent_frames(fed)
        if counted <= 0:
            return None
        # update=True: end_utt leaves the mean as it was if the last frames were silent.
        after = _parse_cmn(self._decoder.get_cmn(True))
        if after.shape != self._prior.shape:
            return None
        mean = (after * (CMN_WINDOW + counted) - self._prior * CMN_WINDOW) / counted
        if not np.all(np.isfinite(mean)):
            return None
        return ",".join(f"{x:.4f}" for x in mean)

    def _text(self, tokens: Iterable[str]) -> str:
        out: list[str] = []
        for token in tokens:
            word = _ALTERNATE.sub("", token)
            if _is_filler(word):
                continue
            term = self._keyterm(word)
            out.append(term.text if term is not None else word)
        return " ".join(out)

    def _timed_words(self, token: str, start_ms: int, end_ms: int) -> list[WordTiming]:
        word = _ALTERNATE.sub("", token)
        if _is_filler(word):
            return []
        term = self._keyterm(word)
        if term is None or len(term.word_phones) == 1:
            return [WordTiming(term.text if term else word, start_ms, end_ms)]
        # A phrase is one decoder word: share its span among its words by phone count.
        total = sum(term.word_phones)
        out: list[WordTiming] = []
        at = 0
        for text, n in zip(term.text.split(), term.word_phones, strict=True):
            t0 = start_ms + (end_ms - start_ms) * at // total
            at += n
            out.append(WordTiming(text, t0, start_ms + (end_ms - start_ms) * at // total))
        return out

    def _keyterm(self, word: str) -> Keyterm | None:
        match = _ALIAS_RE.fullmatch(word)
        return self.plan.usable[int(match.group(1))] if match else None


def _pcm(samples: Samples) -> bytes:
    return samples.astype("<i2", copy=False).tobytes()


def _parse_cmn(text: str) -> npt.NDArray[np.float64]:
    return np.array([float(x) for x in text.split(",")], dtype=np.float64)


def _silent_frames(samples: Samples) -> int:
    """Frames (10 ms shift, 25.6 ms window) whose samples are all zero."""
    n = len(samples) // _FRAME_SHIFT
    if n == 0:
        return 0
    nonzero = np.concatenate([[0], np.cumsum(samples != 0)])
    starts = np.arange(n) * _FRAME_SHIFT
    ends = np.minimum(starts + _FRAME_WINDOW, len(samples))
    return int(np.count_nonzero(nonzero[ends] == nonzero[starts]))


def _is_filler(word: str) -> bool:
    # <s>, </s>, <sil>, [NOISE], [SPEECH]; +NOISE+-style fillers of other models.
    return not word or word.startswith(("<", "[", "+"))


# -- the stream (event loop) ----------------------------------------------------


@dataclass(slots=True)
class _Utterance:
    index: int
    start: int
    """Stream index of its first sample."""
    fed: int
    """Stream index up to which its audio went to the decoder."""
    end: int | None = None
    """Stream index after its last sample; ``None`` while it is open."""
    ended_at: float = 0.0
    """``time.monotonic()`` when it was ended (its endpoint)."""
    real_time: bool = False
    """Whether the stream sent it in real time (its final's lateness is the pool's)."""
    announced: bool = False
    partial: str = ""
    rescore: bool = True
    """Whether its final decodes its audio again; once False (it ran past the
    bound while open, and its audio was let go) it stays so."""


# -- the worker processes ---------------------------------------------------------

_HOSTED: dict[int, SphinxDecoder] = {}
"""The decoders living in this worker process, by key."""


def _host_create(key: int, prompt: str | None) -> KeytermPlan:
    decoder = _HOSTED[key] = SphinxDecoder(prompt)
    return decoder.plan


def _host_feed(key: int, samples: Samples) -> str:
    return _HOSTED[key].feed(samples)


def _host_finish(key: int, fed: Samples | None, length: int) -> Result:
    return _HOSTED[key].finish(fed, length)


def _host_drop(key: int) -> None:
    _HOSTED.pop(key, None)


def _leave_stopping_to_the_gateway() -> None:
    """In a worker process: ignore SIGINT and SIGTERM.  A terminal's Ctrl-C (or a
    process manager's group-wide SIGTERM) reaches every process of the group; the
    gateway drains on it and shuts its workers down last.  A worker that took it
    died mid-decode, failing its sessions, and the KeyboardInterrupt it sent back
    as the call's result killed the server.  A worker whose gateway is gone ends
    when the call queue's pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SphinxProcesses:
    """Worker processes hosting the streams' decoders (one per decode worker).

    A decoder keeps its state in the process that created it, so each stream is
    assigned one process (the least loaded) and all its calls go there.  The
    processes start on first use (``spawn``: the gateway has threads, which
    ``fork`` would copy in a broken state).
    """

    def __init__(self, workers: int) -> None:
        self._executors: list[ProcessPoolExecutor | None] = [None] * workers
        self._streams = [0] * workers
        self._keys = itertools.count()

    def assign(self) -> tuple[int, int]:
        """A new decoder's key and the index of the process to host it."""
        index = min(range(len(self._streams)), key=self._streams.__getitem__)
        self._streams[index] += 1
        return next(self._keys), index

    def executor(self, index: int) -> ProcessPoolExecutor:
        executor = self._executors[index]
        if executor is None:
            context = multiprocessing.get_context("spawn")
            executor = self._executors[index] = ProcessPoolExecutor(
                1, mp_context=context, initializer=_leave_stopping_to_the_gateway
            )
        return executor

    def replace_broken(self, index: int, broken: ProcessPoolExecutor) -> None:
        """A worker process died: later calls start a new one (its decoders are lost)."""
        if self._executors[index] is broken:
            self._executors[index] = None
            broken.shutdown(wait=False, cancel_futures=True)

    def release(self, key: int, index: int) -> None:
        """The stream is closed: free its decoder (after any call still running)."""
        self._streams[index] -= 1
        executor = self._executors[index]
        if executor is not None:
            with contextlib.suppress(RuntimeError, BrokenProcessPool):  # shut down already
                executor.submit(_host_drop, key)

    def shutdown(self) -> None:
        for executor in self._executors:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


class SphinxStream(RecognizeStream):
    """VAD-segmented incremental recognition with one pocketsphinx decoder.

    Args:
        stt: the engine (``LocalSTT``).
        options: the session's options; ``prompt`` holds keyterms.
        pool: the shared decode slots (one per core).
        processes: the worker processes that host the decoders.
        max_utterance_ms: an utterance longer than this is cut.
        on_close: called once, when the stream is closed.
        rescore_max_ms: utterances up to this long get a second pass for their
            final (see the module docstring); 0 turns it off.
    """

    def __init__(
        self,
        stt: STT,
        options: StreamOptions,
        pool: DecodePool,
        processes: SphinxProcesses,
        *,
        max_utterance_ms: int,
        on_close: Callable[[], None],
        rescore_max_ms: int = RESCORE_MAX_MS,
    ) -> None:
        super().__init__(stt, options)
        self._pool = pool
        self._processes = processes
        self._key, self._host = processes.assign()
        self._executor: ProcessPoolExecutor | None = None
        """The process its decoder lives in (the first one its calls went to)."""
        self._on_close_cb: Callable[[], None] | None = on_close
        self._activity = voice_activity(options, max_utterance_ms)
        self._keep = lookback_samples(options, 500)  # history kept between utterances
        self._max_backlog = MAX_BACKLOG_MS * SAMPLE_RATE // 1000
        self._min_batch = MIN_BATCH_MS * SAMPLE_RATE // 1000
        self._rescore_max = rescore_max_ms * SAMPLE_RATE // 1000
        self._audio = AudioBuffer()
        self._clock = RealTimeClock()
        self._count = 0  # utterances begun
        self._last_end = 0
        self._utterances: deque[_Utterance] = deque()
        """Utterances not final yet, oldest first (the task works on the first)."""
        self._wake = asyncio.Event()
        """Set when there is something new for the task (audio, an endpoint, the end)."""
        self._progress = asyncio.Event()
        """Set when the task decoded something or stopped (releases backpressure)."""
        self._decoder_ready = False
        """The decoder exists in its worker process."""
        self.keyterms: tuple[str, ...] = ()
        """Keyterms in use (known once the decoder is ready)."""
        self.ignored_keyterms: tuple[str, ...] = ()
        """Keyterms that cannot be used (known once the decoder is ready)."""

    # -- input side (event loop) ------------------------------------------------

    def _take_audio(self, samples: Samples) -> bool:
        # Only a decoder too far behind makes a chunk wait.  A chunk grows the
        # backlog by itself plus, if it starts an utterance, the history the
        # start is dated back into (at most ``_keep``): below that, no waiting,
        # so the chunk is taken here, without a task (the usual case).
        if self._backlog() + len(samples) + self._keep > self._max_backlog:
            return False
        if not self._activity.inline(samples):
            return False  # heard off the loop, in _on_audio
        self._clock.audio_arrived()
        self._feed(samples, self._activity.process(samples))
        return True

    async def _on_audio(self, samples: Samples) -> None:
        self._clock.audio_arrived()
        # The audio joins the buffer with its boundaries, after (the decode task
        # would trim audio an utterance is about to start in).
        heard = await hear(self._activity, self._audio, samples)
        self._feed(samples, heard)
        # Backpressure: the client waits while the decoder is too far behind.
        while self._backlog() > self._max_backlog and not self._stopped():
            self._progress.clear()
            await self._progress.wait()

    def _feed(self, samples: Samples, heard: list[VadEvent]) -> None:
        """Take a chunk and the boundaries the VAD heard in it."""
        self._audio.append(samples)
        for event in heard:
            if event.kind == "start":
                self._begin_utterance(event.sample)
            else:
                self._end_utterance(event.sample)
        self._trim()
        self._wake.set()

    def _begin_utterance(self, sample: int) -> None:
        # Never before the previous utterance's end: no audio is decoded twice.
        start = max(sample, self._audio.start, self._last_end)
        self._utterances.append(_Utterance(self._count, start, fed=start))
        self._count += 1

    def _end_utterance(self, sample: int) -> None:
        utterance = self._utterances[-1]
        utterance.end = max(sample, utterance.start)
        utterance.ended_at = time.monotonic()
        # The buffer's end counts every sample taken (trimming keeps the count).
        utterance.real_time = self._clock.in_real_time(self._audio.end)
        self._last_end = utterance.end

    def progress_at(self) -> float:
        # This session's last decode may wait behind others' in the shared pool.
        return self._pool.finished_at

    async def _on_end_input(self) -> None:
        if self._activity.in_speech:
            # Trailing speech with no silence after it: finalize up to the last sample.
            self._activity.endpointer.in_speech = False
            self._end_utterance(self._audio.end)
        self._wake.set()

    def _backlog(self) -> int:
        """Samples pushed that the decoder has not seen yet."""
        return self._audio.end - min((u.fed for u in self._utterances), default=self._audio.end)

    def _stopped(self) -> bool:
        return self._closed or self._task is None or self._task.done()

    def _rescores(self, utterance: _Utterance) -> bool:
        # Open, it is measured to the audio so far, the silence being heard
        # included, which its end will not count: it can seem over the bound, and
        # lose its audio to _trim, yet end within it. So the answer sticks: a
        # final must not decode again audio that is gone (it read one word).
        end = utterance.end if utterance.end is not None else self._audio.end
        if end - utterance.start > self._rescore_max:
            utterance.rescore = False
        return utterance.rescore

    def _trim(self) -> None:
        # An utterance still to be decoded again keeps its audio from its start.
        needed = min(
            (u.start if self._rescores(u) else u.fed for u in self._utterances),
            default=self._audio.end,
        )
        self._audio.discard_before(min(needed, self._audio.end - self._keep))

    # -- output side (the stream's task) -----------------------------------------

    async def _run(self) -> None:
        prompt = self._options.prompt
        # Created while speech may already be starting: SPEECH_STARTED need not wait.
        creating = asyncio.ensure_future(self._call(_host_create, self._key, prompt))
        creating.add_done_callback(self._report_keyterms)
        try:
            while True:
                if not self._utterances:
                    if self._input_ended:
                        # Normally long done; a failure to load is reported all the same.
                        await creating
                        return
                    await self._wait()
                    continue
                utterance = self._utterances[0]
                if not utterance.announced:
                    utterance.announced = True
                    await self._emit(
                        SpeechEvent(
                            SpeechEventType.SPEECH_STARTED,
                            utterance.index,
                            start_ms=to_ms(utterance.start),
                        )
                    )
                if not self._decoder_ready:
                    await creating
                    self._decoder_ready = True
                stop = utterance.end if utterance.end is not None else self._audio.end
                ready = utterance.end is not None or stop - utterance.fed >= self._min_batch
                if stop > utterance.fed and ready:
                    await self._decode(utterance, stop)
                elif utterance.end is not None:
                    await self._finish(utterance)
                else:
                    await self._wait()
        finally:
            creating.cancel()
            self._progress.set()

    async def _wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the decoder's process, holding a decode slot."""
        executor = self._processes.executor(self._host)
        if self._executor is None:
            self._executor = executor
        elif executor is not self._executor:  # replaced: its decoder died with the old one
            raise ProviderError("LOCAL", "the pocketsphinx worker process died")
        try:
            return await self._pool.run(functools.partial(fn, *args), executor)
        except BrokenProcessPool as exc:
            self._processes.replace_broken(self._host, executor)
            raise ProviderError("LOCAL", "the pocketsphinx worker process died") from exc

    async def _decode(self, utterance: _Utterance, stop: int) -> None:
        audio = self._audio.slice(utterance.fed, stop)
        utterance.fed = stop
        self._trim()
        text = await self._call(_host_feed, self._key, audio)
        self._progress.set()
        # No partial when the final is next anyway.
        final_next = utterance.end is not None and utterance.fed >= utterance.end
        if text and text != utterance.partial and not final_next:
            utterance.partial = text
            await self._emit(SpeechEvent(SpeechEventType.PARTIAL, utterance.index, text=text))

    async def _finish(self, utterance: _Utterance) -> None:
        end = utterance.end if utterance.end is not None else utterance.fed
        # The decoder saw up to ``fed``: also the silence that ended the utterance.
        fed = (
            self._audio.slice(utterance.start, utterance.fed) if self._rescores(utterance) else None
        )
        length = end - utterance.start
        result = await self._call(_host_finish, self._key, fed, length)
        if utterance.real_time:
            # What callers feel of the engine's load: admission reads it.
            self._pool.final_delivered(time.monotonic() - utterance.ended_at)
        start_ms, end_ms = to_ms(utterance.start), to_ms(end)
        if result.text:
            words = tuple(
                WordTiming(
                    w.word,
                    min(start_ms + w.start_ms, end_ms),
                    min(start_ms + w.end_ms, end_ms),
                    w.confidence,
                )
                for w in result.words
            )
            await self._emit(
                SpeechEvent(
                    SpeechEventType.FINAL,
                    utterance.index,
                    text=result.text,
                    start_ms=start_ms,
                    end_ms=end_ms,
                    words=words,
                )
            )
        await self._emit(
            SpeechEvent(SpeechEventType.SPEECH_STOPPED, utterance.index, end_ms=end_ms)
        )
        self._utterances.popleft()
        self._trim()
        self._progress.set()

    def _report_keyterms(self, creating: asyncio.Future[KeytermPlan]) -> None:
        if creating.cancelled() or creating.exception() is not None:
            return
        plan = creating.result()
        self.keyterms = tuple(k.text for k in plan.usable)
        self.ignored_keyterms = plan.ignored
        if plan.ignored:
            # The terms themselves are client content: logged only at debug level.
            log.info(
                "pocketsphinx: keyterms ignored (a word not in its dictionary, "
                f"or over {MAX_KEYTERMS} keyterms)",
                extra={"ignored": len(plan.ignored)},
            )
            log.debug("ignored keyterms", extra={"keyterms": list(plan.ignored)})

    async def _on_close(self) -> None:
        self._decoder_ready = False
        self._processes.release(self._key, self._host)
        self._utterances.clear()
        self._audio.clear()
        self._progress.set()
        callback, self._on_close_cb = self._on_close_cb, None
        if callback is not None:
            callback()
