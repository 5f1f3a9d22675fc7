"""A provider plugin (``CHECKSUM``) that proves every chunk reached the engine, in order.

It hashes the samples it is given and, at the end of input, emits one final
whose text is ``"<samples> <sha256 prefix>"``, which a test compares with the
hash of what it sent.  The model picks how the engine takes audio, to cover the
gateway's two paths (:meth:`RecognizeStream.push_audio_nowait` and the awaited
:meth:`RecognizeStream.push_audio`):

* ``fast``: every chunk is taken at once;
* ``mixed``: every third chunk pushes back (and then waits 2 ms);
* ``slow``: every chunk goes through the awaited path and waits 2 ms;
* ``sluggish``: the same, 50 ms (a push is almost always under way).
"""

from __future__ import annotations

import asyncio
import hashlib
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


class ChecksumSTT(STT):
    provider = "CHECKSUM"

    def models(self) -> Sequence[ModelInfo]:
        return [ModelInfo(n, supports_prompt=False) for n in ("fast", "mixed", "slow", "sluggish")]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream = ChecksumStream(self, options)
        stream.start()
        return stream


class ChecksumStream(RecognizeStream):
    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._hash = hashlib.sha256()
        self._samples = 0
        self._offers = 0
        self._done = asyncio.Event()

    def _take_audio(self, samples: Samples) -> bool:
        self._offers += 1
        model = self.options.model
        if model in ("slow", "sluggish") or (model == "mixed" and self._offers % 3 == 0):
            return False
        self._add(samples)
        return True

    async def _on_audio(self, samples: Samples) -> None:
        # A real wait: later messages must queue behind it.
        await asyncio.sleep(0.05 if self.options.model == "sluggish" else 0.002)
        self._add(samples)

    def _add(self, samples: Samples) -> None:
        self._hash.update(samples.astype("<i2").tobytes())
        self._samples += len(samples)

    async def _on_end_input(self) -> None:
        self._done.set()

    async def _run(self) -> None:
        await self._done.wait()
        text = f"{self._samples} {self._hash.hexdigest()[:16]}"
        await self._emit(SpeechEvent(SpeechEventType.FINAL, 0, text=text, end_ms=0))
