"""A scriptable provider plugin (``FAULTY``) for the gateway's failure paths.

The embedded engine cannot be made to fail on demand, so this plugin, loaded
through the same plugin interface any third-party engine uses, fails in the
ways a real engine can.  The model name picks the failure:

* ``fail-after-audio``: raises ``ProviderError`` once 0.5 s of audio arrived;
* ``hang-on-finalize``: echoes a final per 0.5 s of audio but never finishes
  after ``end_input`` (a finalize that never returns);
* ``crash-on-open``: ``open_stream`` raises a plain exception (a bug);
* ``refuse-on-open``: ``open_stream`` fails as a provider refusing the key does.
* ``echo``: a final per 0.5 s of audio, text = the count, and a clean end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import (
    STT,
    ModelInfo,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)

HALF_SECOND = 8000


class FaultySTT(STT):
    provider = "FAULTY"

    def models(self) -> Sequence[ModelInfo]:
        names = ("fail-after-audio", "hang-on-finalize", "crash-on-open", "refuse-on-open", "echo")
        return [ModelInfo(n, supports_prompt=False) for n in names]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        if options.model == "crash-on-open":
            raise RuntimeError("bug in the engine")
        if options.model == "refuse-on-open":
            raise ProviderError("FAULTY", "authentication refused (HTTP 401)", retryable=False)
        stream = FaultyStream(self, options)
        stream.start()
        return stream


class FaultyStream(RecognizeStream):
    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._samples = 0
        self._emitted = 0
        self._audio: asyncio.Queue[int | None] = asyncio.Queue(64)

    async def _on_audio(self, samples: Samples) -> None:
        await self._audio.put(len(samples))

    async def _on_end_input(self) -> None:
        await self._audio.put(None)

    async def _run(self) -> None:
        model = self.options.model
        while (n := await self._audio.get()) is not None:
            self._samples += n
            if model == "fail-after-audio" and self._samples >= HALF_SECOND:
                raise ProviderError("FAULTY", "connection reset by the engine")
            while self._samples - self._emitted * HALF_SECOND >= HALF_SECOND:
                start = self._emitted * 500
                await self._emit(
                    SpeechEvent(SpeechEventType.SPEECH_STARTED, self._emitted, start_ms=start)
                )
                await self._emit(
                    SpeechEvent(
                        SpeechEventType.FINAL,
                        self._emitted,
                        text=f"chunk {self._emitted}",
                        start_ms=start,
                        end_ms=start + 500,
                    )
                )
                await self._emit(
                    SpeechEvent(SpeechEventType.SPEECH_STOPPED, self._emitted, end_ms=start + 500)
                )
                self._emitted += 1
        if model == "hang-on-finalize":
            await asyncio.Event().wait()  # never returns
