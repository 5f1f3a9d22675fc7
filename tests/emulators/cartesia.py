"""An emulator of Cartesia's STT WebSocket (``ink-whisper``), written from its public docs.

What it implements, and where the docs say so:

* ``/stt/websocket``; the key in ``X-API-Key`` or the ``api_key`` query
  parameter, the API version in ``Cartesia-Version`` or ``cartesia_version``;
  query ``model``, ``language`` (default ``en``), ``encoding`` (``pcm_s16le``),
  ``sample_rate`` (16000 in version 2025-04-16), ``min_volume``,
  ``max_silence_duration_secs`` (silence that finalizes an utterance) -
  https://docs.cartesia.ai/2025-04-16/api-reference/stt/stt,
  https://docs.cartesia.ai/2024-06-10/api-reference/stt/stt
* binary audio; text commands ``finalize`` (answered ``flush_done``) and
  ``done`` (flush, answer ``done``, close; later versions call it ``close``);
  disconnects after 20 s without a message -
  https://docs.cartesia.ai/2025-04-16/api-reference/stt/stt,
  https://github.com/cartesia-ai/cartesia-js/blob/main/src/resources/stt/manual-finalize/manual-finalize.ts
* ``transcript`` messages: ``is_final``, ``text`` (a delta since the last
  final chunk), ``duration`` (seconds of audio that produced the chunk),
  ``language``, ``words`` (``word``, ``start``, ``end`` in seconds, here
  relative to the chunk: each final chunk starts where the previous one
  ended), ``request_id`` -
  https://docs.cartesia.ai/api-reference/stt/stt,
  https://docs.cartesia.ai/use-the-api/stt/common-pitfalls
* ``text`` carries the model's own spacing, to be appended verbatim: a chunk
  after the first starts with its word's space (``"This is a"``, ``" single
  sentence."``), and a chunk may end inside a word (``"Insert"``, ``"ing
  spaces is not safe"``) -
  https://docs.cartesia.ai/use-the-api/stt/common-pitfalls,
  https://github.com/cartesia-ai/cartesia-js/blob/main/src/resources/stt/manual-finalize/manual-finalize.ts
  ("Do not strip whitespace from `text` or add whitespace between chunks")
* errors ``{"type": "error", "error", "request_id"}`` then a close; bad
  credentials an HTTP 401 on the upgrade; too many connections HTTP 429 -
  https://docs.cartesia.ai/2025-04-16/api-reference/stt/stt

Cartesia sends no speech events and nothing for silence.  Text commands are
recorded as ``{"command": ..., "audio_ms": ...}`` in :attr:`Record.text`; a
``finalize`` that arrives after 2 s or more without audio counts as a
keepalive (it only keeps the connection from its idle timeout).

The emulator's own choice of where deltas split: each utterance's final text
goes out as two final chunks cut inside its first word of four letters or
more (``"go forw"``, ``"ard ten meters"``); the cut word's timing is in the
first chunk's ``words``, which ends with it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.emulators.recognizer import Heard, Recognizer, Segment, Word
from tests.emulators.server import Emulator, Record

PATH = "/stt/websocket"
MODELS = frozenset({"ink-whisper", "ink-whisper-2025-06-04"})
RATES = frozenset({16000})
KEEPALIVE_GAP_S = 2.0
"""A ``finalize`` this long after the last audio is there to keep the connection open."""
SPLIT_LETTERS = 4
"""A final's first word at least this long is cut in two between two chunks."""


class MarkingRecognizer(Recognizer):
    """A recognizer that can flush mid-speech and queue an acknowledgement after it.

    :meth:`Recognizer.flush` closes the open segment while its VAD still hears
    speech; the VAD's own end then finds no segment (an assertion error).  Here
    the rest of that speech becomes a new segment, as a provider's next chunk.
    """

    def flush(self) -> None:
        super().flush()
        if self._vad.in_speech:
            self._start = self._last_interim = len(self._audio)

    def _end(self, sample: int) -> None:
        if self._start is not None:
            super()._end(sample)

    def mark(self, kind: str) -> None:
        """Queue a ``Heard(kind)`` after every event already due."""
        self._spawn(self._marker(kind))

    async def _marker(self, kind: str) -> None:
        async with self._work:  # after every decode spawned before it
            await self._events.put(Heard(kind, Segment(0, 0)))


@dataclass
class _State:
    request_id: str
    language: str
    chunk_start_ms: int = 0
    """End of the audio already delivered in final chunks."""
    said: bool = False
    """Some final chunk had text: the next text starts with its word's space."""
    last_audio: float = 0.0


class CartesiaEmulator(Emulator):
    """Cartesia ``ink-whisper`` on a local port."""

    idle_close_s: float = 20.0
    """Disconnect after this long without a message (the docs' 20 s)."""
    fail_after_ms: float | None = None
    """Send an ``error`` message and close after this much audio."""

    def authorized(self, request: Request) -> bool:
        query = parse_qs(urlsplit(request.path).query)
        return request.headers.get("X-API-Key") == self.api_key or query.get("api_key") == [
            self.api_key
        ]

    def refuse(self, request: Request) -> Response:
        body = json.dumps({"error": "Invalid API key", "code": 401}).encode()
        headers = Headers([("Content-Type", "application/json")])
        return Response(HTTPStatus.UNAUTHORIZED, "Unauthorized", headers, body)

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != PATH:
            return Response(HTTPStatus.NOT_FOUND, "Not Found", Headers(), b"Not Found")
        version = request.headers.get("Cartesia-Version") or parse_qs(parts.query).get(
            "cartesia_version"
        )
        if not version:
            body = b'{"error": "Cartesia-Version header is required"}'
            return Response(HTTPStatus.BAD_REQUEST, "Bad Request", Headers(), body)
        return await super()._check(connection, request)

    async def session(self, ws: ServerConnection, record: Record) -> None:
        state = _State(
            uuid.uuid4().hex, record.param("language") or "en", last_audio=time.monotonic()
        )
        problem = self._check_query(record)
        if problem is not None:
            await self._error(ws, record, state, problem)
            return
        silence_s = float(record.param("max_silence_duration_secs") or 0.5)
        recognizer = MarkingRecognizer(
            int(record.param("sample_rate") or 0), endpointing_ms=round(silence_s * 1000)
        )
        await self.converse(
            self._read(ws, record, recognizer, state),
            self._answer(ws, record, recognizer, state),
            recognizer,
        )

    @staticmethod
    def _check_query(record: Record) -> str | None:
        if record.param("model") not in MODELS:
            return "Invalid model: The model is not valid, make sure it is a valid model ID."
        if record.param("encoding") != "pcm_s16le":
            return "Invalid encoding: only pcm_s16le is supported."
        rate = record.param("sample_rate") or ""
        if not rate.isdigit() or int(rate) not in RATES:
            return "Invalid sample_rate: only 16000 is supported."
        language = record.param("language") or "en"
        if not (language.isalpha() and 2 <= len(language) <= 3):
            return f"Invalid language: {language}"
        for name in ("min_volume", "max_silence_duration_secs"):
            value = record.param(name)
            if value is not None:
                try:
                    float(value)
                except ValueError:
                    return f"Invalid {name}: {value}"
        return None

    async def _read(
        self, ws: ServerConnection, record: Record, recognizer: MarkingRecognizer, state: _State
    ) -> None:
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), self.idle_close_s)
            except TimeoutError:
                await ws.close(1000, "idle timeout: no audio received")
                return
            if isinstance(message, bytes):
                record.binary_frames += 1
                state.last_audio = time.monotonic()
                self.audio(ws, record, recognizer, message)
                await self.pace(record)
                limit = self.fail_after_ms
                if limit is not None and record.audio_ms >= limit:
                    await self._error(
                        ws, record, state, "Internal server error: transcriber failed"
                    )
                    return
                continue
            command = message.strip()
            record.text.append({"command": command, "audio_ms": record.audio_ms})
            if command == "finalize":
                if time.monotonic() - state.last_audio >= KEEPALIVE_GAP_S:
                    record.keepalives += 1
                recognizer.flush()
                recognizer.mark("flush_done")
            elif command in ("done", "close"):
                record.finalized = True
                if await self.closed_on_finalize(ws):
                    return
                if not self.faults.ignore_finalize:
                    recognizer.flush()
                    recognizer.mark("done")
            else:
                await self._error(ws, record, state, f"Unknown command: {command!r}")
                return

    async def _answer(
        self, ws: ServerConnection, record: Record, recognizer: MarkingRecognizer, state: _State
    ) -> None:
        async for heard in recognizer.events():
            segment = heard.segment
            if heard.kind == "interim":
                text = self._spaced(state, " ".join(w.word for w in segment.words))
                chunk = self._transcript(state, text, segment.words, segment.end_ms, final=False)
                await self.send(ws, record, chunk)
            elif heard.kind == "final":
                for text, words, end_ms in self._final_chunks(state, segment):
                    chunk = self._transcript(state, text, words, end_ms, final=True)
                    await self.send(ws, record, chunk)
                    state.chunk_start_ms = end_ms
                    state.said |= bool(text)
            elif heard.kind == "flush_done":
                await self.send(ws, record, {"type": "flush_done", "request_id": state.request_id})
            elif heard.kind == "done":
                await self.send(ws, record, {"type": "done", "request_id": state.request_id})
                if not record.stalled:
                    await ws.close()
                return
            # "started" / "stopped": Cartesia has no speech events.

    @staticmethod
    def _spaced(state: _State, text: str) -> str:
        # Whisper's tokens carry their leading space; only the stream's first has none.
        return f" {text}" if text and state.said else text

    @classmethod
    def _final_chunks(cls, state: _State, segment: Segment) -> list[tuple[str, list[Word], int]]:
        """A final segment as final chunks ``(text, words, end_ms)``, cut inside a word."""
        words = segment.words
        cut = next((n for n, w in enumerate(words) if len(w.word) >= SPLIT_LETTERS), None)
        if cut is None:
            text = cls._spaced(state, " ".join(w.word for w in words))
            return [(text, words, segment.end_ms)]
        word = words[cut].word
        half = len(word) // 2
        head = cls._spaced(state, " ".join([*(w.word for w in words[:cut]), word[:half]]))
        tail = "".join([word[half:], *(f" {w.word}" for w in words[cut + 1 :])])
        return [
            (head, words[: cut + 1], words[cut].end_ms),
            (tail, words[cut + 1 :], max(segment.end_ms, words[cut].end_ms)),
        ]

    @staticmethod
    def _transcript(
        state: _State, text: str, words: list[Word], end_ms: int, *, final: bool
    ) -> dict[str, Any]:
        base = state.chunk_start_ms

        def seconds(ms: int) -> float:
            return round(max(0, ms - base) / 1000, 3)

        return {
            "type": "transcript",
            "request_id": state.request_id,
            "is_final": final,
            "text": text,
            "duration": seconds(end_ms),
            "language": state.language,
            "words": [
                {"word": w.word, "start": seconds(w.start_ms), "end": seconds(w.end_ms)}
                for w in words
            ],
        }

    async def _error(self, ws: ServerConnection, record: Record, state: _State, text: str) -> None:
        await self.send(
            ws, record, {"type": "error", "error": text, "request_id": state.request_id}
        )
        await ws.close()
