"""``NOOP``: a provider that does no recognition, for measuring the gateway's own cost.

Loaded through the provider plugin interface (from the repository root:
``PYTHONPATH=. TRANSCRIBE_PLUGINS=bench.noop_provider:NoopSTT transcribe-gateway
serve``), as any third-party engine would be.  Every
``EVERY_SAMPLES`` of audio it emits a ``transcription.partial`` whose text is
the number of samples received so far, so the load generator knows which
chunk each event covers and can measure chunk-sent -> event-received latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.providers.base import (
    STT,
    ModelInfo,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)

EVERY_SAMPLES = 3200
"""One event per 200 ms of 16 kHz audio (every 10th 20 ms chunk)."""


class NoopSTT(STT):
    provider = "NOOP"

    def models(self) -> Sequence[ModelInfo]:
        return [ModelInfo("noop", supports_prompt=False, supports_vad=False)]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream = NoopStream(self, options)
        stream.start()
        return stream


class NoopStream(RecognizeStream):
    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._samples = 0
        self._next = EVERY_SAMPLES
        self._done = asyncio.Event()

    async def _on_audio(self, samples: Samples) -> None:
        event = self._count(samples)
        if event is not None:
            await self._emit(event)

    def _take_audio(self, samples: Samples) -> bool:
        # The gateway's fast path: taken at once, with no task or queue hop per
        # chunk besides the event channel (one event at most per chunk).
        if not self._event_room():
            return False
        event = self._count(samples)
        if event is not None:
            self._emit_nowait(event)
        return True

    def _count(self, samples: Samples) -> SpeechEvent | None:
        self._samples += len(samples)
        if self._samples < self._next:
            return None
        self._next += EVERY_SAMPLES
        return SpeechEvent(SpeechEventType.PARTIAL, 0, text=str(self._samples))

    async def _on_end_input(self) -> None:
        self._done.set()

    async def _run(self) -> None:
        await self._done.wait()
