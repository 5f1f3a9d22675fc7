"""A provider plugin (``MISORDERED``) that sends its events out of the protocol's order.

The protocol promises each utterance ``speech.started``, partials, one
``transcription.completed`` and ``speech.stopped``, in that order; a
third-party engine may not keep to it.  Once 0.5 s of audio arrived, model
``scrambled`` sends, on its utterance 0: started, a partial, a final, a late
partial, a second final; on its utterance 1: started, stopped, then its final;
then it fails with 0 and its stop still open.
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

E = SpeechEventType
SCRIPT = (
    SpeechEvent(E.SPEECH_STARTED, 0, start_ms=100),
    SpeechEvent(E.PARTIAL, 0, "one"),
    SpeechEvent(E.FINAL, 0, "one two", 100, 400),
    SpeechEvent(E.PARTIAL, 0, "one two three"),
    SpeechEvent(E.FINAL, 0, "three", 400, 500),
    SpeechEvent(E.SPEECH_STARTED, 1, start_ms=600),
    SpeechEvent(E.SPEECH_STOPPED, 1, end_ms=900),
    SpeechEvent(E.FINAL, 1, "late", 600, 900),
    SpeechEvent(E.SPEECH_STOPPED, 1, end_ms=900),
)


class MisorderedSTT(STT):
    provider = "MISORDERED"

    def models(self) -> Sequence[ModelInfo]:
        return [ModelInfo("scrambled", supports_prompt=False)]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream = MisorderedStream(self, options)
        stream.start()
        return stream


class MisorderedStream(RecognizeStream):
    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._audio: asyncio.Queue[int] = asyncio.Queue()

    async def _on_audio(self, samples: Samples) -> None:
        await self._audio.put(len(samples))

    async def _on_end_input(self) -> None:
        await self._audio.put(0)

    async def _run(self) -> None:
        received = 0
        while received < 8000:
            received += await self._audio.get()
        for event in SCRIPT:
            await self._emit(event)
        raise ProviderError("MISORDERED", "connection reset")
