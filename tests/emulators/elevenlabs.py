"""An emulator of ElevenLabs' realtime speech-to-text WebSocket, written from its public docs.

What it implements, and where the docs say so:

* ``/v1/speech-to-text/realtime``; the key in the ``xi-api-key`` header
  (single-use ``token`` query parameters are not emulated); query ``model_id``
  (``scribe_v2_realtime``), ``audio_format`` (``pcm_8000`` ... ``pcm_48000``,
  ``ulaw_8000``; default ``pcm_16000``), ``language_code``,
  ``commit_strategy`` (``manual`` default, ``vad``), ``vad_silence_threshold_secs``
  (0.3-3.0, default 1.5), ``vad_threshold`` (0.1-0.9), ``min_speech_duration_ms``
  and ``min_silence_duration_ms`` (50-2000), ``include_timestamps`` -
  https://elevenlabs.io/docs/api-reference/speech-to-text/v-1-speech-to-text-realtime,
  https://github.com/elevenlabs/elevenlabs-python/blob/main/src/elevenlabs/realtime/scribe.py
* ``session_started`` first; client messages are JSON ``input_audio_chunk``
  (``audio_base_64``, ``commit``, ``sample_rate``, ``previous_text`` only with
  the first chunk, else an error); each commit is answered by a
  ``committed_transcript`` (then ``committed_transcript_with_timestamps`` with
  ``include_timestamps``); ``partial_transcript`` carries the uncommitted text;
  with ``commit_strategy=vad`` the service commits by itself after the silence
  threshold -
  https://github.com/elevenlabs/elevenlabs-python/blob/main/src/elevenlabs/realtime/connection.py,
  https://cdn.jsdelivr.net/npm/@elevenlabs/elevenlabs-js@2.39.0/api/types/InputAudioChunkPayload.d.ts,
  https://elevenlabs.io/docs/eleven-api/guides/how-to/speech-to-text/realtime/event-reference
* words: ``text``, ``start``/``end`` in seconds of the session's audio,
  ``type`` (``word`` / ``spacing``), ``logprob``; errors are messages named by
  their ``message_type`` (``auth_error``, ``input_error``,
  ``invalid_request``, ``quota_exceeded``, ``insufficient_audio_activity``...)
  with an ``error`` text, after which the service closes - same pages.

ElevenLabs documents no end-of-stream message: a client commits, reads the
answer and closes, so every commit sets :attr:`Record.finalized`,
``ignore_finalize`` leaves commits unanswered and ``close_on_finalize`` closes
at a commit.  It documents no keepalive
either: an audio chunk that ends a gap of 2 s or more counts as one.  The idle
limit behind ``insufficient_audio_activity`` is not documented, so
:attr:`ElevenLabsEmulator.idle_close_s` is off unless a test sets it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from tests.emulators.cartesia import MarkingRecognizer
from tests.emulators.recognizer import Word
from tests.emulators.server import Emulator, Record

PATH = "/v1/speech-to-text/realtime"
MODELS = frozenset({"scribe_v2_realtime"})
FORMATS = {f"pcm_{rate}": rate for rate in (8000, 16000, 22050, 24000, 44100, 48000)}
KEEPALIVE_GAP_S = 2.0


@dataclass
class _State:
    vad_commits: bool
    timestamps: bool
    language: str
    pending: list[Word] = field(default_factory=list)
    """Final words not committed yet."""
    chunks: int = 0
    last_audio: float = 0.0


class ElevenLabsEmulator(Emulator):
    """ElevenLabs ``scribe_v2_realtime`` on a local port."""

    path: ClassVar[str | None] = PATH
    auth_in_session: ClassVar[bool] = True  # refusals are error messages, not HTTP 401

    idle_close_s: float | None = None
    """Send ``insufficient_audio_activity`` and close after this long without a chunk."""
    fail_after: tuple[float, str, str] | None = None
    """(audio ms, ``message_type``, ``error``): send that error and close."""

    def authorized(self, request: Request) -> bool:
        return request.headers.get("xi-api-key") == self.api_key

    async def session(self, ws: ServerConnection, record: Record) -> None:
        assert ws.request is not None
        if self.faults.reject_auth or not self.authorized(ws.request):
            await self._error(ws, record, "auth_error", "You must be authenticated to use this.")
            return
        problem = self._check_query(record)
        if problem is not None:
            await self._error(ws, record, "invalid_request", problem)
            return
        audio_format = record.param("audio_format") or "pcm_16000"
        vad_commits = record.param("commit_strategy") == "vad"
        silence_s = float(record.param("vad_silence_threshold_secs") or 1.5)
        recognizer = MarkingRecognizer(
            FORMATS[audio_format], endpointing_ms=round(silence_s * 1000) if vad_commits else 500
        )
        state = _State(
            vad_commits,
            record.param("include_timestamps") == "true",
            record.param("language_code") or "en",
            last_audio=time.monotonic(),
        )
        config = {
            "sample_rate": FORMATS[audio_format],
            "audio_format": audio_format,
            "language_code": record.param("language_code"),
            "model_id": record.param("model_id"),
            "commit_strategy": record.param("commit_strategy") or "manual",
            "include_timestamps": state.timestamps,
        }
        await self.send(
            ws,
            record,
            {"message_type": "session_started", "session_id": uuid.uuid4().hex, "config": config},
        )
        await self.converse(
            self._read(ws, record, recognizer, state),
            self._answer(ws, record, recognizer, state),
            recognizer,
        )

    @staticmethod
    def _check_query(record: Record) -> str | None:
        if record.param("model_id") not in MODELS:
            return "Invalid model_id."
        if (record.param("audio_format") or "pcm_16000") not in FORMATS:
            return "Unsupported audio_format (this emulator takes PCM)."
        if (record.param("commit_strategy") or "manual") not in ("manual", "vad"):
            return "commit_strategy must be manual or vad."
        if (record.param("include_timestamps") or "false") not in ("true", "false"):
            return "include_timestamps must be true or false."
        ranges = {
            "vad_silence_threshold_secs": (0.3, 3.0),
            "vad_threshold": (0.1, 0.9),
            "min_speech_duration_ms": (50, 2000),
            "min_silence_duration_ms": (50, 2000),
        }
        for name, (low, high) in ranges.items():
            value = record.param(name)
            if value is not None:
                try:
                    number = float(value)
                except ValueError:
                    return f"Invalid {name}."
                if not low <= number <= high:
                    return f"{name} must be between {low} and {high}."
        language = record.param("language_code")
        if language is not None and not (language.isalpha() and 2 <= len(language) <= 3):
            return "Invalid language_code."
        return None

    async def _read(
        self, ws: ServerConnection, record: Record, recognizer: MarkingRecognizer, state: _State
    ) -> None:
        rate = recognizer.rate
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), self.idle_close_s)
            except TimeoutError:
                await self._error(
                    ws, record, "insufficient_audio_activity", "No audio received for too long."
                )
                return
            if isinstance(message, bytes):
                await self._error(ws, record, "input_error", "Messages must be JSON text.")
                return
            chunk: dict[str, Any] = json.loads(message)
            record.text.append(chunk)
            if chunk.get("message_type") != "input_audio_chunk":
                await self._error(ws, record, "invalid_request", "Unknown message_type.")
                return
            if chunk.get("sample_rate", rate) != rate:
                await self._error(ws, record, "input_error", "sample_rate does not match.")
                return
            if chunk.get("previous_text") is not None and state.chunks:
                await self._error(
                    ws, record, "input_error", "previous_text is only allowed in the first chunk."
                )
                return
            state.chunks += 1
            try:
                pcm16 = base64.b64decode(chunk.get("audio_base_64") or "", validate=True)
            except binascii.Error:
                await self._error(ws, record, "input_error", "audio_base_64 is not base64.")
                return
            if pcm16:
                now = time.monotonic()
                if now - state.last_audio >= KEEPALIVE_GAP_S:
                    record.keepalives += 1
                state.last_audio = now
                self.audio(ws, record, recognizer, pcm16)
                await self.pace(record)
                failure = self.fail_after
                if failure is not None and record.audio_ms >= failure[0]:
                    await self._error(ws, record, failure[1], failure[2])
                    return
            if chunk.get("commit"):
                record.finalized = True
                if await self.closed_on_finalize(ws):
                    return
                if not self.faults.ignore_finalize:
                    recognizer.flush()
                    recognizer.mark("commit")

    async def _answer(
        self, ws: ServerConnection, record: Record, recognizer: MarkingRecognizer, state: _State
    ) -> None:
        async for heard in recognizer.events():
            words = heard.segment.words
            if heard.kind == "interim":
                text = _text(state.pending + words)
                if text:
                    await self.send(
                        ws, record, {"message_type": "partial_transcript", "text": text}
                    )
            elif heard.kind == "final":
                state.pending.extend(words)
                if state.vad_commits:
                    await self._commit(ws, record, state)
            elif heard.kind == "commit":
                await self._commit(ws, record, state)
            # "started" / "stopped": ElevenLabs has no speech events.

    async def _commit(self, ws: ServerConnection, record: Record, state: _State) -> None:
        words, state.pending = state.pending, []
        text = _text(words)
        await self.send(ws, record, {"message_type": "committed_transcript", "text": text})
        if state.timestamps:
            await self.send(
                ws,
                record,
                {
                    "message_type": "committed_transcript_with_timestamps",
                    "text": text,
                    "language_code": state.language,
                    "words": _timestamps(words),
                },
            )

    async def _error(self, ws: ServerConnection, record: Record, kind: str, text: str) -> None:
        await self.send(ws, record, {"message_type": kind, "error": text})
        await ws.close()


def _text(words: list[Word]) -> str:
    return " ".join(w.word for w in words)


def _timestamps(words: list[Word]) -> list[dict[str, Any]]:
    """Words and the spacing between them, times in seconds of the session's audio."""
    items: list[dict[str, Any]] = []
    for i, word in enumerate(words):
        if i:
            before = words[i - 1]
            items.append(
                {
                    "text": " ",
                    "start": before.end_ms / 1000,
                    "end": word.start_ms / 1000,
                    "type": "spacing",
                    "logprob": 0.0,
                }
            )
        items.append(
            {
                "text": word.word,
                "start": word.start_ms / 1000,
                "end": word.end_ms / 1000,
                "type": "word",
                "logprob": round(math.log(max(word.probability, 1e-6)), 4),
            }
        )
    return items
