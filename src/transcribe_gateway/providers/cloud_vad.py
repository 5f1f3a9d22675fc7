"""Voice activity on the gateway's side for cloud providers silent during silence.

Two kinds of provider answer only speech, so a stream cannot expect an answer
to every second of audio (``CloudStream.answers_continuously`` is false there)
and must work out itself when one is due:

* :class:`LocalEndpointingStream`: providers with no VAD events of their own
  (Cartesia, ElevenLabs).  The gateway's own Silero VAD (the session's ``vad``
  and ``endpointing`` settings; a long chunk heard on a worker thread, as in
  LOCAL, see :mod:`transcribe_gateway.audio.vad`) gives ``speech.started`` /
  ``speech.stopped``;
  at each end of speech the stream sends the provider's flush (or commit),
  whose answer both bounds the wait for the provider (a fallback can take over
  if it never comes) and marks the end of the utterance.
* :class:`LoudnessWatch`: providers with a server VAD (OpenAI, Qwen) that say
  nothing until it hears speech; a cheap loudness measure tells when their
  VAD should have spoken.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from typing import ClassVar

import numpy as np

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.providers.base import StreamOptions
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame
from transcribe_gateway.providers.local_common import voice_activity

VAD_RATE = 16000
"""The rate of the audio the VAD hears (the rate its event samples count in)."""
MAX_UTTERANCE_MS = 60_000
SPEECH_RMS = 300.0
"""int16 RMS (about -40 dBFS) above which a frame counts as speech-level audio."""
SPEECH_DUE_MS = 500
"""Speech-level audio (leaky count) after which ``speech_started`` is due."""
STOP_GRACE_MS = 1000
"""Quiet beyond the session's endpointing after which ``speech_stopped`` is due."""


class LocalEndpointingStream(CloudStream):
    """A provider stream whose utterances are cut by the gateway's Silero VAD.

    Subclasses give :meth:`flush_frame` (sent in order with the audio at each
    end of speech) and, on the receive side under :attr:`_lock`, call
    :meth:`flush_answered` when the provider answers a flush and
    :meth:`close_utterance` once it has answered for all audio up to it.  VAD
    boundaries heard while a flush is unanswered are held back until then,
    so speech events and transcripts stay in order.
    """

    answers_continuously: ClassVar[bool] = False  # silent while it hears silence

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._vad = voice_activity(options, MAX_UTTERANCE_MS)
        self._lock = asyncio.Lock()
        """Serializes utterance bookkeeping between the audio and the receive side."""
        self._flushes = 0
        """Flushes sent whose answer has not come yet."""
        self._held: deque[tuple[str, int]] = deque()
        """VAD boundaries heard while a flush is pending (they belong after it)."""
        self._speaking = False
        self._stop_due: int | None = None
        """End of speech (ms) to report once the provider answered for it."""

    @abc.abstractmethod
    def flush_frame(self) -> Frame:
        """The provider's message that flushes (commits) the audio sent so far."""

    def expect_flush(self) -> None:
        """A flush goes out: its answer is due."""
        self._flushes += 1
        self.expect_answer()

    def flush_answered(self) -> None:
        self._flushes = max(0, self._flushes - 1)

    def _take_audio(self, samples: Samples) -> bool:
        return False  # the VAD's boundaries wait for the utterance lock: always the task path

    async def _on_audio(self, samples: Samples) -> None:
        await super()._on_audio(samples)
        # A long chunk (a phone client's 16 s of mu-law: ~60 ms of Silero) is heard
        # on a worker thread, as LOCAL does, not on the loop every session shares;
        # a short one inline, where a thread hop would cost more than Silero.
        # Cancelled once the VAD took the chunk, its boundaries come with the next
        # chunk's (the provider has the audio already: it was sent first).
        if self._vad.inline(samples):
            heard = self._vad.process(samples)
        else:
            heard = await self._vad.process_async(samples)
        for event in heard:
            ms = event.sample * 1000 // VAD_RATE
            if event.kind == "end":
                # After the audio that ends the utterance: flush it now.
                self.expect_flush()
                await self.queue(self.flush_frame())
            async with self._lock:
                if self._flushes > (1 if event.kind == "end" else 0) or self._held:
                    self._held.append((event.kind, ms))
                else:
                    await self._apply(event.kind, ms)

    async def _apply(self, kind: str, ms: int) -> None:
        if kind == "start":
            self._speaking = True
            await self.utterances.speech_started(ms)
        else:
            self._speaking = False
            if self.utterances.text:
                await self.utterances.speech_stopped(ms)  # open until its final
            else:
                self._stop_due = ms  # nothing heard yet: stopping now would close it

    async def close_utterance(self) -> None:
        """The provider answered for the audio so far: final, then (maybe) stop."""
        if self._stop_due is not None:
            end, self._stop_due = self._stop_due, None
            await self.utterances.complete(end)
            await self.utterances.speech_stopped(max(end, self.utterances.last_end_ms))
        elif self._speaking:
            await self.utterances.complete()  # e.g. a keepalive flush in a pause mid-speech
        else:
            await self.utterances.flush()
        # Boundaries heard meanwhile, up to the end of speech the next flush closes.
        while self._held:
            kind, ms = self._held.popleft()
            await self._apply(kind, ms)
            if kind == "end":
                break


class LoudnessWatch:
    """When a provider's server VAD owes an answer, judged by loudness.

    An answer is due after about half a second of speech-level audio with no
    ``speech_started`` (a leaky count, so noise bursts do not add up), and
    after the session's endpointing plus a grace of quiet inside speech
    (``speech_stopped``).  The adapter awaits the transcript after
    ``speech_stopped`` itself.
    """

    def __init__(self, sample_rate: int, endpointing_ms: int) -> None:
        self._sample_rate = sample_rate
        self._endpointing_ms = endpointing_ms
        self._loud_ms = 0.0
        self._quiet_ms = 0.0

    def process(self, pcm16: bytes, *, speaking: bool) -> bool:
        """Take one frame sent to the provider.

        Args:
            pcm16: little-endian pcm16 at the stream's rate.
            speaking: whether the provider's VAD has speech open.

        Returns:
            Whether an answer (``speech_started`` or ``speech_stopped``) is due.
        """
        samples = np.frombuffer(pcm16, "<i2").astype(np.float32)
        frame_ms = len(samples) * 1000 / self._sample_rate
        loud = bool(len(samples)) and float(np.sqrt(np.mean(samples**2))) > SPEECH_RMS
        if speaking:
            self._quiet_ms = 0.0 if loud else self._quiet_ms + frame_ms
            return self._quiet_ms >= self._endpointing_ms + STOP_GRACE_MS
        self._loud_ms = max(0.0, self._loud_ms + (frame_ms if loud else -frame_ms))
        return self._loud_ms >= SPEECH_DUE_MS

    def reset(self) -> None:
        """The provider heard speech start: count afresh."""
        self._loud_ms = self._quiet_ms = 0.0
