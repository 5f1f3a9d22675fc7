"""Provider plugins that get the plugin interface wrong, each in one way.

Loaded like any third-party engine (``TRANSCRIBE_PLUGINS``, or an entry point),
to check that one bad plugin costs its own provider only: the server starts,
lists the others, and serves them.

* ``InitRaises`` (``INITBAD``): its ``__init__`` raises (a missing key);
* ``NoName``: has no ``provider`` (``STT`` only annotates it);
* ``ClaimsLocal``: names itself ``LOCAL`` without LOCAL's models;
* ``StartRaises`` (``STARTBAD``): its ``start`` raises (cannot warm up);
* ``ModelsRaises`` (``MODELSBAD``): its ``models`` raises (backend down);
* ``LowerCase``: ``provider = "lowered"``, served as ``LOWERED``;
* ``Regional`` (``REGIONAL``): a model declaring region tags ``en-US``, ``de-DE``;
* ``Replacement``: claims ``CARTESIA``, a built-in's name;
* ``InputRaises`` (``INPUTBAD``): echoes a final per 0.5 s of audio, like
  ``FAULTY``'s ``echo``; the model picks an input side that raises a plain
  exception (outside ``_run``): ``raise-on-audio`` (``_on_audio``, once 0.5 s
  arrived), ``raise-on-take`` (``_take_audio``, likewise), ``raise-on-end``
  (``_on_end_input``), or none (``echo``); ``unstarted-echo`` is ``echo`` from
  an ``open_stream`` that forgets ``stream.start()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.config import Settings
from transcribe_gateway.providers.base import (
    STT,
    ModelInfo,
    RecognizeStream,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)

HALF_SECOND = 8000


class EchoStream(RecognizeStream):
    """A final per 0.5 s of audio (text ``chunk <n>``); ends at the end of input."""

    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._audio: asyncio.Queue[int | None] = asyncio.Queue(16)
        self._samples = 0
        self._emitted = 0

    async def _on_audio(self, samples: Samples) -> None:
        self._check(samples, "raise-on-audio")
        await self._audio.put(len(samples))

    def _take_audio(self, samples: Samples) -> bool:
        if self.options.model != "raise-on-take" or self._audio.full():
            return False
        self._check(samples, "raise-on-take")
        self._audio.put_nowait(len(samples))
        return True

    def _check(self, samples: Samples, model: str) -> None:
        self._samples += len(samples)
        if self.options.model == model and self._samples > HALF_SECOND:
            raise ValueError(f"bug in the plugin's input side ({model})")

    async def _on_end_input(self) -> None:
        if self.options.model == "raise-on-end":
            raise ValueError("bug in the plugin's end of input")
        await self._audio.put(None)

    async def _run(self) -> None:
        received = 0
        while (n := await self._audio.get()) is not None:
            received += n
            while received - self._emitted * HALF_SECOND >= HALF_SECOND:
                u, start = self._emitted, self._emitted * 500
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, u, start_ms=start))
                await self._emit(
                    SpeechEvent(SpeechEventType.FINAL, u, f"chunk {u}", start, start + 500)
                )
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, u, end_ms=start + 500))
                self._emitted += 1


class Echo(STT):
    provider = "ECHO"
    names: tuple[str, ...] = ("echo",)
    languages: tuple[str, ...] | None = None

    def models(self) -> Sequence[ModelInfo]:
        return [ModelInfo(n, languages=self.languages, supports_prompt=False) for n in self.names]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        stream = EchoStream(self, options)
        if options.model != "unstarted-echo":
            stream.start()
        return stream


class InitRaises(Echo):
    provider = "INITBAD"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        raise RuntimeError("INITBAD_API_KEY is not set\n(a second line)")


class NoName(STT):
    def models(self) -> Sequence[ModelInfo]:
        return []

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        raise NotImplementedError


class ClaimsLocal(Echo):
    provider = "LOCAL"


class StartRaises(Echo):
    provider = "STARTBAD"

    async def start(self) -> None:
        raise RuntimeError("cannot warm up")

    def is_ready(self) -> bool:
        return False  # it never finished starting


class ModelsRaises(Echo):
    provider = "MODELSBAD"

    def models(self) -> Sequence[ModelInfo]:
        raise RuntimeError("cannot list models (backend down)")


class LowerCase(Echo):
    provider = "lowered"


class Regional(Echo):
    provider = "REGIONAL"
    languages = ("en-US", "de-DE")


class Replacement(Echo):
    provider = "CARTESIA"


class InputRaises(Echo):
    provider = "INPUTBAD"
    names = ("echo", "raise-on-audio", "raise-on-take", "raise-on-end", "unstarted-echo")
