"""Streaming pocketsphinx 5 (model ``pocketsphinx-en-us``) for the LOCAL provider.

pocketsphinx is incremental, so unlike Whisper nothing is re-decoded:

* Silero VAD (the same :class:`~transcribe_gateway.audio.vad.VoiceActivity` as the
  Whisper stream) cuts the stream into utterances, so both LOCAL models report
  ``speech.started``/``speech.stopped`` the same way; a pre-roll of
  ``vad_prefix_padding_ms`` is kept so an utterance's first phone is not lost;
* each stream owns one ``Decoder``, created on a pool worker (~0.33 s, ~90 MB) and
  reused for all its utterances: its cepstral mean carries over, and a fresh
  decoder per utterance is clearly less accurate (``../shared/ENGINES.md``);
* the audio that arrived since the previous call goes to the decoder in one
  ``process_raw`` call on a pool worker (one call in flight per stream: a
  ``Decoder`` is not thread-safe); when ``hyp()`` changes, that is a partial;
* at the endpoint ``end_utt()`` gives the final and ``seg()`` the word times.
  ``fwdflat`` and ``bestpath`` are off: ``end_utt`` drops from ~280 ms to ~15 ms
  at no loss of accuracy here, and with ``bestpath`` on the words got worse. The
  price is that pocketsphinx then has no posterior (every probability is 1.0),
  so words carry no confidence (``None``) rather than a meaningless one.

Every event comes from the stream's task, in order: ``SPEECH_STARTED``,
``PARTIAL``\\*, ``FINAL`` (when there is text), ``SPEECH_STOPPED``, one
utterance after the other. A client faster than the decoder waits in
``push_audio`` once ``MAX_BACKLOG_MS`` of audio is undecoded.

Keyterms (``session.prompt``, comma separated). pocketsphinx offers keyword
spotting (``add_kws``/``add_keyphrase``), but that search replaces the language
model: it would output the keyterms and nothing else, so it cannot bias a
transcription. Its n-gram model cannot be re-weighted for a word it already
knows either (``NGramModel.add_word`` leaves an existing word's probability as
it is). What works is adding a *new* word: each usable keyterm becomes a
dictionary entry with its dictionary pronunciation (a phrase: its words'
pronunciations joined) and a unigram ``KEYTERM_BOOST`` times the uniform
probability; the decoder then takes that boosted path when the audio fits, and
the stream writes the keyterm back as its words. That also makes recognizable
the ~53,000 dictionary words that the language model lacks (``github``,
``aalsmeer``...). A keyterm with a word missing from the CMU dictionary cannot
be used (pocketsphinx has no grapheme-to-phoneme): it is left out, logged, and
listed in :attr:`SphinxStream.ignored_keyterms`; :func:`plan_keyterms` lets a
caller check a prompt beforehand. Only the first pronunciation of each word is
used for the boosted path (the plain path keeps all of them).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import SAMPLE_RATE, Endpointer, VoiceActivity
from transcribe_gateway.providers.base import (
    STT,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
    WordTiming,
)
from transcribe_gateway.providers.pool import DecodePool

log = logging.getLogger(__name__)

FRAMES_PER_SECOND: Final = 100
"""pocketsphinx's frame rate (10 ms shift)."""
MAX_BACKLOG_MS: Final = 3000
"""Undecoded audio a stream may hold before ``push_audio`` waits (backpressure)."""
RESCORE_MAX_MS: Final = 10000
"""Utterances up to this long get their final from a second, whole-utterance pass."""
KEYTERM_BOOST: Final = 1000.0
"""Unigram probability of a keyterm, relative to the uniform one (1/vocabulary)."""
MAX_KEYTERMS: Final = 100
"""Keyterms used at most; the rest are ignored (each one enlarges the search)."""
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
    """Phone count of each word (to split a phrase's time among its words)."""


@dataclass(frozen=True, slots=True)
class KeytermPlan:
    """What a prompt becomes: keyterms used, and those that cannot be."""

    usable: tuple[Keyterm, ...] = ()
    ignored: tuple[str, ...] = ()


def parse_keyterms(prompt: str | None) -> list[str]:
    """Split a comma-separated prompt into distinct, normalized keyterms."""
    terms: list[str] = []
    for raw in (prompt or "").split(","):
        words = (w.strip(_STRIP) for w in raw.lower().split())
        term = " ".join(w for w in words if w)
        if term and term not in terms:
            terms.append(term)
    return terms


def plan_keyterms(prompt: str | None, lookup: Callable[[str], str | None]) -> KeytermPlan:
    """Decide which keyterms of ``prompt`` the dictionary can pronounce.

    Args:
        prompt: ``session.prompt``, comma separated keyterms.
        lookup: word -> space-separated phones, or ``None`` when the word is not
            in the dictionary (``Decoder.lookup_word``).

    Returns:
        The usable keyterms (at most :data:`MAX_KEYTERMS`) and the ignored ones.
        A hyphenated word missing from the dictionary is pronounced as its parts
        (``ill-disposed`` -> ``ill disposed``).
    """
    usable: list[Keyterm] = []
    ignored: list[str] = []
    for term in parse_keyterms(prompt):
        words: list[str] = []
        prons: list[str] = []
        for token in term.split():
            word = token if lookup(token) else token.strip(".") or token
            phones = lookup(word)
            if phones:
                words.append(word)
                prons.append(phones)
                continue
            parts = [p for p in word.split("-") if p]
            part_phones = [lookup(p) for p in parts] if len(parts) > 1 else [None]
            if all(part_phones):
                words.extend(parts)
                prons.extend(p for p in part_phones if p)
                continue
            words = []
            break
        if not words or len(usable) >= MAX_KEYTERMS:
            ignored.append(term)
            continue
        usable.append(
            Keyterm(" ".join(words), " ".join(prons), tuple(len(p.split()) for p in prons))
        )
    return KeytermPlan(tuple(usable), tuple(ignored))


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

        # loglevel FATAL: pocketsphinx writes its INFO/WARN lines to stderr otherwise.
        self._decoder: Any = Decoder(fwdflat=False, bestpath=False, loglevel="FATAL")
        self._in_utt = False
        self.plan = plan_keyterms(prompt, self._decoder.lookup_word)
        """Keyterms used and ignored."""
        if self.plan.usable:
            self._add_keyterms(self.plan.usable)

    def _add_keyterms(self, keyterms: Sequence[Keyterm]) -> None:
        decoder = self._decoder
        lm = decoder.get_lm()
        # The unigram must exist with its boost before the dictionary adds the
        # word (which would add it to the model at the uniform probability).
        for i, term in enumerate(keyterms):
            lm.add_word(_ALIAS.format(i), KEYTERM_BOOST)
        for i, term in enumerate(keyterms):
            decoder.add_word(_ALIAS.format(i), term.phones, False)
        # Rebuild the search over the updated dictionary and model.
        decoder.add_lm("keyterms", lm)
        decoder.activate_search("keyterms")

    def feed(self, audio: bytes) -> str:
        """Decode more of the current utterance (starting one if needed); the text so far."""
        if not self._in_utt:
            self._decoder.start_utt()
            self._in_utt = True
        self._decoder.process_raw(audio, False, False)
        hyp = self._decoder.hyp()
        return self._words_text(hyp.hypstr.split()) if hyp is not None else ""

    def finish(self, utterance: bytes | None = None) -> Result:
        """End the current utterance; its final text and words (times from its start).

        Args:
            utterance: the whole utterance's audio, to decode it again in one
                pass with the cepstral mean of the utterance itself (see the
                module docstring); ``None`` keeps the incremental result.
        """
        if self._in_utt:
            self._decoder.end_utt()
            self._in_utt = False
        elif utterance is None:
            return Result("", ())
        if utterance is not None:
            self._decoder.start_utt()
            try:
                self._decoder.process_raw(utterance, False, True)
            finally:
                self._decoder.end_utt()
        words: list[WordTiming] = []
        for seg in self._decoder.seg():
            start_ms = seg.start_frame * 1000 // FRAMES_PER_SECOND
            end_ms = (seg.end_frame + 1) * 1000 // FRAMES_PER_SECOND
            words.extend(self._timed_words(str(seg.word), start_ms, end_ms))
        return Result(" ".join(w.word for w in words), tuple(words))

    def _words_text(self, tokens: Iterable[str]) -> str:
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
            # No posterior without bestpath: confidence unknown.
            return [WordTiming(term.text if term else word, start_ms, end_ms)]
        # A phrase is one decoder word: share its span by phone count.
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


def _is_filler(word: str) -> bool:
    # <s>, </s>, <sil>, [NOISE], [SPEECH], and +XXX+ fillers of other models.
    return word.startswith(("<", "[", "+")) or not word


# -- the stream (event loop) ----------------------------------------------------


@dataclass(slots=True)
class _Utterance:
    index: int
    start: int
    """Stream index of its first sample."""
    end: int | None = None
    """Stream index after its last sample; ``None`` while it is open."""
    fed: int = 0
    """Stream index up to which its audio went to the decoder."""
    announced: bool = False
    partial: str = ""


class SphinxStream(RecognizeStream):
    """VAD-segmented incremental recognition with one pocketsphinx decoder."""

    def __init__(
        self,
        stt: STT,
        options: StreamOptions,
        pool: DecodePool,
        *,
        max_utterance_ms: int,
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(stt, options)
        self._pool = pool
        self._on_close_cb = on_close
        self._activity = VoiceActivity(
            Endpointer(
                threshold=options.vad_threshold,
                min_speech_ms=options.vad_min_speech_ms,
                endpointing_ms=options.endpointing_ms,
                prefix_padding_ms=options.vad_prefix_padding_ms,
                max_utterance_ms=max_utterance_ms,
            )
        )
        # Enough history for an utterance start, which the VAD dates back by the
        # prefix padding plus the voiced time it needs before deciding.
        self._keep = (
            (options.vad_prefix_padding_ms + options.vad_min_speech_ms + 500) * SAMPLE_RATE // 1000
        )
        self._max_backlog = MAX_BACKLOG_MS * SAMPLE_RATE // 1000
        self._rescore_max = RESCORE_MAX_MS * SAMPLE_RATE // 1000
        self._chunks: list[Samples] = []
        self._buf_start = 0  # stream index of the first buffered sample
        self._pos = 0  # samples pushed so far
        self._count = 0  # utterances begun
        self._last_end = 0
        self._utterances: deque[_Utterance] = deque()
        self._wake = asyncio.Event()
        """Set when there is something new for the task (audio, an endpoint, the end)."""
        self._progress = asyncio.Event()
        """Set when the task decoded something or stopped (releases backpressure)."""
        self._decoder: SphinxDecoder | None = None
        self._close_called = False
        self.keyterms: tuple[str, ...] = ()
        """Keyterms in use (known once the decoder is ready)."""
        self.ignored_keyterms: tuple[str, ...] = ()
        """Keyterms that cannot be used (a word missing from the dictionary)."""

    # -- input side (event loop) ------------------------------------------------

    async def _on_audio(self, samples: Samples) -> None:
        if len(samples) == 0:
            return
        self._chunks.append(samples)
        self._pos += len(samples)
        for event in self._activity.process(samples):
            if event.kind == "start":
                self._begin_utterance(event.sample)
            else:
                self._end_utterance(event.sample)
        self._trim()
        self._wake.set()
        # Backpressure: wait while the decoder is too far behind.
        while self._backlog() > self._max_backlog and not self._stopped():
            self._progress.clear()
            await self._progress.wait()

    def _begin_utterance(self, sample: int) -> None:
        start = max(sample, self._buf_start, self._last_end)
        self._utterances.append(_Utterance(self._count, start, fed=start))
        self._count += 1

    def _end_utterance(self, sample: int) -> None:
        utterance = self._utterances[-1]
        utterance.end = max(sample, utterance.start)
        self._last_end = utterance.end

    async def _on_end_input(self) -> None:
        if self._activity.in_speech:
            # Trailing speech with no silence after it: finalize up to the last sample.
            self._activity.endpointer.in_speech = False
            self._end_utterance(self._pos)
        self._wake.set()

    def _backlog(self) -> int:
        """Samples the decoder has not seen yet."""
        return self._pos - min((u.fed for u in self._utterances), default=self._pos)

    def _stopped(self) -> bool:
        return self._closed or self._task is None or self._task.done()

    def _trim(self) -> None:
        # Unfinished utterances keep all their audio, for the final pass.
        needed = min((u.start for u in self._utterances), default=self._pos)
        keep_from = min(needed, self._pos - self._keep)
        drop = keep_from - self._buf_start
        if drop <= 0 or not self._chunks:
            return
        buffered = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [buffered[drop:]]
        self._buf_start += min(drop, len(buffered))

    def _take(self, start: int, end: int) -> bytes:
        """The buffered samples ``[start, end)`` as pcm16 bytes."""
        buffered = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [buffered]
        lo = max(0, start - self._buf_start)
        hi = max(0, end - self._buf_start)
        return buffered[lo:hi].astype("<i2", copy=False).tobytes()

    # -- output side (the stream's task) -----------------------------------------

    async def _run(self) -> None:
        try:
            prompt = self._options.prompt
            decoder = await self._pool.run(lambda: SphinxDecoder(prompt))
            self._decoder = decoder
            self._report_keyterms(decoder.plan)
            while True:
                if not self._utterances:
                    if self._input_ended:
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
                            start_ms=_ms(utterance.start),
                        )
                    )
                stop = utterance.end if utterance.end is not None else self._pos
                if utterance.end is not None and self._rescores(utterance):
                    # Its end is known: the final pass decodes it all anyway.
                    utterance.fed = utterance.end
                if stop > utterance.fed:
                    await self._decode(decoder, utterance, stop)
                elif utterance.end is not None:
                    await self._finish(decoder, utterance)
                else:
                    await self._wait()
        finally:
            self._decoder = None
            self._progress.set()

    async def _wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def _decode(self, decoder: SphinxDecoder, utterance: _Utterance, stop: int) -> None:
        audio = self._take(utterance.fed, stop)
        utterance.fed = stop
        self._trim()
        text = await self._pool.run(lambda: decoder.feed(audio))
        self._progress.set()
        # No partial when the final is next anyway.
        final_next = utterance.end is not None and utterance.fed >= utterance.end
        if text and text != utterance.partial and not final_next:
            utterance.partial = text
            await self._emit(SpeechEvent(SpeechEventType.PARTIAL, utterance.index, text=text))

    def _rescores(self, utterance: _Utterance) -> bool:
        end = utterance.end if utterance.end is not None else self._pos
        return end - utterance.start <= self._rescore_max

    async def _finish(self, decoder: SphinxDecoder, utterance: _Utterance) -> None:
        end = utterance.end if utterance.end is not None else utterance.fed
        audio = self._take(utterance.start, end) if self._rescores(utterance) else None
        result = await self._pool.run(lambda: decoder.finish(audio))
        start_ms, end_ms = _ms(utterance.start), _ms(end)
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

    def _report_keyterms(self, plan: KeytermPlan) -> None:
        self.keyterms = tuple(k.text for k in plan.usable)
        self.ignored_keyterms = plan.ignored
        if plan.ignored:
            log.warning(
                "pocketsphinx: keyterms ignored (a word is not in its dictionary)",
                extra={"keyterms": list(plan.ignored)},
            )

    async def _on_close(self) -> None:
        # A decode still running on a worker keeps its own reference to the
        # decoder, which is freed when that call returns.
        self._decoder = None
        self._utterances.clear()
        self._chunks = []
        self._progress.set()
        if not self._close_called:
            self._close_called = True
            self._on_close_cb()


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE
