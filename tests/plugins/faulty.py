"""A scriptable provider plugin (``FAULTY``) for the gateway's failure paths.

The embedded engine cannot be made to fail on demand, so this plugin, loaded
through the same plugin interface any third-party engine uses, fails in the
ways a real engine can.  The model name picks the failure:

* ``fail-after-audio``: raises ``ProviderError`` once 0.5 s of audio arrived;
* ``fail-after-3s``: takes 3 s of audio without a word, then raises;
* ``hang-on-finalize``: echoes a final per 0.5 s of audio but never finishes
  after ``end_input`` (a finalize that never returns);
* ``crash-on-open``: ``open_stream`` raises a plain exception (a bug);
* ``refuse-on-open``: ``open_stream`` fails as a provider refusing the key does.
* ``echo``: a final per 0.5 s of audio, text = the count, and a clean end.
* ``stall-then-fail``: once 0.5 s of audio arrived, stops taking audio (its
  queue of 64 chunks fills, and a push waits) and raises 0.5 s later;
* ``fail-on-finalize``: takes audio, then raises ``ProviderError`` 0.2 s after
  ``end_input`` (a provider that dies while finishing);
* ``count-slow-open``: ``open_stream`` takes 1.5 s (a fallback still
  connecting), then one final at the end, text = the samples it was given;
* ``refuse-slow-open``: ``open_stream`` takes 1.5 s, then fails (a fallback
  that cannot connect within its timeout);
* ``count-slow-finalize``: the same final, 2 s after ``end_input``.
* ``count-hiccup``: the same final at the end, but the 50th push is held for
  1.5 s (a decoder briefly behind: backpressure).
* ``um-then-fail``: once 0.5 s arrived, an utterance that stops with nothing
  final ("um"), then one left open with a partial ("hello wor"); 0.3 s later
  it raises;
* ``um-then-hang``: the same utterances, then it never finishes after ``end_input``;
* ``late-stop``: once 0.5 s arrived, an utterance and its final ("late"); its
  stop comes 0.5 s after ``end_input``;
* ``raise-on-close``: as ``echo``, but closing it raises (an adapter's bug);
* ``chatty-slow-close``: after ``end_input``, an utterance and its final every
  0.2 s for ever (an engine that never finishes its backlog, never silent);
  closing takes 1 s, as a cloud socket's close handshake may.
* ``slow-end-input``: as ``echo``, but ``end_input`` takes 4 s to return (an
  engine that holds the end of the input back while it works through a backlog).
* ``revising``: after ``end_input``, a new partial every 0.2 s for ever, and no
  final (a provider that keeps revising its interim result).
* ``backlog``: after ``end_input``, one utterance whose partial grows by a word
  every 0.3 s for 6 s, then its final (a provider working through a long
  utterance sent faster than real time).
* ``quit-early``: once 0.5 s arrived, its final ("chunk 0"), then the stream
  ends cleanly though the audio goes on (an engine that says it is done early).
* ``drop-when-quiet``: as ``echo``, but raises once no audio came for 1 s (a
  provider closing an idle connection while the client pauses).
* ``stall``: once 0.5 s of audio arrived, stops taking audio for ever without
  failing (its queue of 64 chunks fills, and a push waits).
* ``count-realtime``: takes audio no faster than it plays (a push waits for
  its duration), then one final at the end, text = the samples it was given;
* ``realtime-fail-after-2s``: takes audio no faster than it plays, a final per
  0.5 s, and raises once 2 s arrived.

With ``FAULTY_STREAM_LOG`` set to a file path, every stream appends
``open <id> <model>`` when it opens and ``close <id>`` when it is closed, so a
test can tell a stream the gateway never closed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
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
_ids = itertools.count()


def _log(line: str) -> None:
    if path := os.environ.get("FAULTY_STREAM_LOG"):
        with open(path, "a") as log:
            log.write(line + "\n")


class FaultySTT(STT):
    provider = "FAULTY"

    def models(self) -> Sequence[ModelInfo]:
        names = (
            "fail-after-audio",
            "hang-on-finalize",
            "crash-on-open",
            "refuse-on-open",
            "echo",
            "fail-on-finalize",
            "count-slow-open",
            "refuse-slow-open",
            "stall-then-fail",
            "count-slow-finalize",
            "count-hiccup",
            "raise-on-close",
            "chatty-slow-close",
            "revising",
            "backlog",
            "fail-after-3s",
            "slow-end-input",
            "um-then-fail",
            "um-then-hang",
            "late-stop",
            "quit-early",
            "drop-when-quiet",
            "stall",
            "count-realtime",
            "realtime-fail-after-2s",
        )
        return [ModelInfo(n, supports_prompt=False) for n in names]

    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        if options.model == "crash-on-open":
            raise RuntimeError("bug in the engine")
        if options.model == "refuse-on-open":
            raise ProviderError("FAULTY", "authentication refused (HTTP 401)", retryable=False)
        if options.model in ("count-slow-open", "refuse-slow-open"):
            await asyncio.sleep(1.5)
        if options.model == "refuse-slow-open":
            raise ProviderError("FAULTY", "no connection within 1.5 s")
        stream = FaultyStream(self, options)
        stream.start()
        return stream


SCRIPTED = ("um-then-fail", "um-then-hang", "late-stop")
"""Models that send a fixed script of events once 0.5 s of audio arrived."""


class FaultyStream(RecognizeStream):
    def __init__(self, stt: STT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._samples = 0
        self._pushes = 0
        self._emitted = 0
        self._audio: asyncio.Queue[int | None] = asyncio.Queue(64)
        self._id = next(_ids)
        _log(f"open {self._id} {options.model}")

    async def _on_close(self) -> None:
        _log(f"close {self._id}")
        if self.options.model == "raise-on-close":
            raise OSError("bug in the engine's close")
        if self.options.model == "chatty-slow-close":
            await asyncio.sleep(1.0)

    async def _on_audio(self, samples: Samples) -> None:
        self._pushes += 1
        if "realtime" in self.options.model:
            await asyncio.sleep(len(samples) / self.options.sample_rate)
        if self.options.model == "count-hiccup" and self._pushes == 50:
            await asyncio.sleep(1.5)
        await self._audio.put(len(samples))

    async def _on_end_input(self) -> None:
        if self.options.model == "slow-end-input":
            await asyncio.sleep(4.0)
        await self._audio.put(None)

    async def _script(self, model: str) -> None:
        events = [SpeechEvent(SpeechEventType.SPEECH_STARTED, 0, start_ms=0)]
        if model == "late-stop":
            events.append(SpeechEvent(SpeechEventType.FINAL, 0, "late", 0, 500))
        else:
            events += [
                SpeechEvent(SpeechEventType.PARTIAL, 0, text="um"),
                SpeechEvent(SpeechEventType.SPEECH_STOPPED, 0, end_ms=300),
                SpeechEvent(SpeechEventType.SPEECH_STARTED, 1, start_ms=400),
                SpeechEvent(SpeechEventType.PARTIAL, 1, text="hello wor"),
            ]
        for event in events:
            await self._emit(event)
        if model == "um-then-fail":
            await asyncio.sleep(0.3)
            raise ProviderError("FAULTY", "connection reset mid-utterance")

    async def _next_chunk(self, model: str) -> int | None:
        if model != "drop-when-quiet":
            return await self._audio.get()
        try:
            return await asyncio.wait_for(self._audio.get(), 1.0)
        except TimeoutError:
            raise ProviderError("FAULTY", "closed the idle connection") from None

    async def _run(self) -> None:
        model = self.options.model
        while (n := await self._next_chunk(model)) is not None:
            self._samples += n
            if model == "stall" and self._samples >= HALF_SECOND:
                await asyncio.Event().wait()  # never takes another chunk
            if model == "quit-early" and self._samples >= HALF_SECOND:
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, 0, start_ms=0))
                await self._emit(SpeechEvent(SpeechEventType.FINAL, 0, "chunk 0", 0, 500))
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, 0, end_ms=500))
                return
            if model == "fail-after-audio" and self._samples >= HALF_SECOND:
                raise ProviderError("FAULTY", "connection reset by the engine")
            if model == "realtime-fail-after-2s" and self._samples >= 4 * HALF_SECOND:
                raise ProviderError("FAULTY", "connection reset after 2 s")
            if model == "fail-after-3s":
                if self._samples >= 6 * HALF_SECOND:
                    raise ProviderError("FAULTY", "connection reset after 3 s")
                continue
            if model == "stall-then-fail" and self._samples >= HALF_SECOND:
                await asyncio.sleep(0.5)
                raise ProviderError("FAULTY", "stopped answering, then reset")
            if model.startswith("count-") or model == "fail-on-finalize":
                continue
            if model in SCRIPTED:
                if self._samples >= HALF_SECOND and not self._emitted:
                    self._emitted = 1
                    await self._script(model)
                continue
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
        if model in ("hang-on-finalize", "um-then-hang"):
            await asyncio.Event().wait()  # never returns
        if model == "late-stop":
            await asyncio.sleep(0.5)
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, 0, end_ms=500))
        if model == "chatty-slow-close":
            while True:
                await asyncio.sleep(0.2)
                n = self._emitted
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, n, start_ms=n))
                await self._emit(SpeechEvent(SpeechEventType.FINAL, n, "more", n, n + 1))
                await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, n, end_ms=n + 1))
                self._emitted += 1
        if model == "revising":
            utterance = self._emitted
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, utterance))
            for n in itertools.count():
                await asyncio.sleep(0.2)
                await self._emit(SpeechEvent(SpeechEventType.PARTIAL, utterance, f"still {n}"))
        if model == "backlog":
            utterance = self._emitted
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STARTED, utterance))
            words: list[str] = []
            for n in range(20):
                await asyncio.sleep(0.3)
                words.append(f"w{n}")
                await self._emit(SpeechEvent(SpeechEventType.PARTIAL, utterance, " ".join(words)))
            await self._emit(SpeechEvent(SpeechEventType.FINAL, utterance, " ".join(words)))
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, utterance))
        if model == "fail-on-finalize":
            await asyncio.sleep(0.2)
            raise ProviderError("FAULTY", "connection reset while finalizing")
        if model.startswith("count-"):
            if model == "count-slow-finalize":
                await asyncio.sleep(2.0)
            text = str(self._samples)
            await self._emit(SpeechEvent(SpeechEventType.FINAL, 0, text=text, end_ms=0))
