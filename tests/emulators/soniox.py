"""An emulator of Soniox's real-time WebSocket API, written from its public docs.

What it implements, and where the docs say so:

* endpoint ``/transcribe-websocket``; the key comes with the connection
  (``Authorization: Bearer``) or, deprecated, as ``api_key`` in the start
  request - https://soniox.com/docs/api-reference/stt/websocket-api.mdx,
  https://soniox.com/docs/guides/websocket-authentication
* the start request (``model``, ``audio_format``, ``sample_rate`` and
  ``num_channels`` for raw PCM, ``language_hints``, ``context``,
  ``enable_endpoint_detection``, ``max_endpoint_delay_ms`` 500..3000), then
  binary audio - https://soniox.com/docs/stt/api-reference/websocket-api,
  https://soniox.com/docs/stt/rt/real-time-transcription
* ``{"type": "keepalive"}`` -
  https://soniox.com/docs/speech-to-text/core-concepts/connection-keepalive;
  ``{"type": "finalize"}`` answered by final tokens and ``<fin>`` -
  https://soniox.com/docs/stt/real-time-API/manual-finalization
* an empty frame ends the audio: remaining tokens final, then
  ``{"tokens": [], "finished": true}`` and the server closes -
  https://github.com/soniox/soniox_examples/blob/master/speech_to_text/python/soniox_realtime.py
* responses: ``tokens`` (sub-word ``text`` with its own leading space,
  ``start_ms``, ``end_ms``, ``confidence``, ``is_final``), final tokens once,
  ``<end>`` after an utterance when endpoint detection is on,
  ``final_audio_proc_ms`` / ``total_audio_proc_ms`` -
  https://soniox.com/docs/stt/core-concepts/real-time-transcription,
  https://soniox.com/docs/stt/rt/endpoint-detection
* every error, refused credentials included, is ``{"error_code",
  "error_message"}`` followed by the close (the key is checked with the start
  request, so a bad key is not an HTTP 401) -
  https://soniox.com/docs/stt/rt/error-handling; early termination is a 503
  "Cannot continue request" (:attr:`SonioxEmulator.terminate_after_ms`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from tests.emulators.recognizer import Recognizer, Word
from tests.emulators.server import Emulator, Record

INTERIM_EVERY_MS = 1500
"""Audio between interim decodes: fewer decodes keep finals prompt on a busy CPU."""
PATH = "/transcribe-websocket"
MODELS = frozenset({"stt-rt-v3", "stt-rt-v4", "stt-rt-v5", "stt-rt-preview"})


@dataclass
class _State:
    endpoint_detection: bool
    final_ms: int = 0
    pending_fin: bool = False


def tokens_of(words: list[Word], *, final: bool) -> list[dict[str, Any]]:
    """Words as Soniox tokens: long words split in two sub-word pieces, as Soniox does."""
    tokens = []
    for i, word in enumerate(words):
        glued = i == 0 or word.word[0] in "-'.,?!"  # Whisper splits "ill-disposed"
        text = word.word if glued else " " + word.word
        cut = len(text) // 2 if len(word.word) > 5 else len(text)
        span = word.end_ms - word.start_ms
        middle = word.start_ms + span * cut // len(text)
        for piece, start, end in (
            (text[:cut], word.start_ms, middle),
            (text[cut:], middle, word.end_ms),
        ):
            if piece:
                tokens.append(
                    {
                        "text": piece,
                        "start_ms": start,
                        "end_ms": max(start, end),
                        "confidence": round(word.probability, 4),
                        "is_final": final,
                    }
                )
    return tokens


def marker(text: str) -> dict[str, Any]:
    return {"text": text, "is_final": True}


class SonioxEmulator(Emulator):
    """Soniox ``stt-rt`` models on a local port."""

    path: ClassVar[str | None] = PATH
    # The key may come in the start request (deprecated but documented), and
    # refusals are error responses after the upgrade: no HTTP 401 here.
    auth_in_session: ClassVar[bool] = True

    terminate_after_ms: float | None = None
    """Answer 503 "Cannot continue request" and close after this much audio."""

    def authorized(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def session(self, ws: ServerConnection, record: Record) -> None:
        assert ws.request is not None
        first = await asyncio.wait_for(ws.recv(), 10)
        if not isinstance(first, str):
            await self._error(ws, record, 400, "Start request must be a JSON text message.")
            return
        config: dict[str, Any] = json.loads(first)
        record.text.append(config)
        keyed = self.authorized(ws.request) or config.get("api_key") == self.api_key
        if self.faults.reject_auth or not keyed:
            await self._error(ws, record, 401, "Invalid API key.")
            return
        problem = self._check_config(config)
        if problem is not None:
            await self._error(ws, record, 400, problem)
            return
        recognizer = Recognizer(
            int(config["sample_rate"]),
            endpointing_ms=int(config.get("max_endpoint_delay_ms", 2000)),
            interim_every_ms=INTERIM_EVERY_MS,
        )
        state = _State(bool(config.get("enable_endpoint_detection")))
        await self.converse(
            self._read(ws, record, recognizer, state),
            self._answer(ws, record, recognizer, state),
            recognizer,
        )

    @staticmethod
    def _check_config(config: dict[str, Any]) -> str | None:
        if config.get("model") not in MODELS:
            return "Invalid model specified."
        if config.get("audio_format") != "pcm_s16le":
            return "Unsupported audio_format (this emulator takes pcm_s16le)."
        if not isinstance(config.get("sample_rate"), int) or config.get("num_channels") != 1:
            return "sample_rate and num_channels are required for raw audio (mono here)."
        delay = config.get("max_endpoint_delay_ms", 2000)
        if not isinstance(delay, int) or not 500 <= delay <= 3000:
            return "max_endpoint_delay_ms must be between 500 and 3000."
        context = config.get("context")
        if context is not None and not isinstance(context, (str, dict)):
            return "Invalid context."
        return None

    async def _read(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, state: _State
    ) -> None:
        async for message in ws:
            if message in (b"", ""):
                record.finalized = True  # end of audio
                if await self.closed_on_finalize(ws):
                    return
                if not self.faults.ignore_finalize:
                    recognizer.flush()
                    recognizer.finish()
                continue
            if isinstance(message, bytes):
                record.binary_frames += 1
                self.audio(ws, record, recognizer, message)
                await self.pace(record)
                finish = self.faults.finish_after_ms
                if finish is not None and record.audio_ms >= finish:
                    await self.send(ws, record, {"tokens": [], "finished": True})
                    await ws.close()
                    return
                limit = self.terminate_after_ms
                if limit is not None and record.audio_ms >= limit:
                    await self._error(
                        ws,
                        record,
                        503,
                        "Cannot continue request (code 1). Please restart the request.",
                    )
                    return
                # Soniox answers as it processes audio, speech or not.
                await self.send(ws, record, self._progress(recognizer, state, []))
                continue
            request = json.loads(message)
            record.text.append(request)
            kind = request.get("type")
            if kind == "keepalive":
                record.keepalives += 1
            elif kind == "finalize":
                state.pending_fin = True
                recognizer.flush()
            else:
                await self._error(ws, record, 400, f"Unknown control message type {kind!r}.")
                return

    async def _answer(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, state: _State
    ) -> None:
        async for heard in recognizer.events():
            segment = heard.segment
            if heard.kind == "interim":
                tokens = tokens_of(segment.words, final=False)
            elif heard.kind == "final":
                tokens = tokens_of(segment.words, final=True)
                if state.endpoint_detection:
                    tokens.append(marker("<end>"))
                if state.pending_fin:
                    tokens.append(marker("<fin>"))
                    state.pending_fin = False
                state.final_ms = segment.end_ms
            else:
                continue  # Soniox has no VAD events
            if tokens:
                await self.send(ws, record, self._progress(recognizer, state, tokens))
        finished = self._progress(recognizer, state, [marker("<fin>")] if state.pending_fin else [])
        finished["final_audio_proc_ms"] = finished["total_audio_proc_ms"]
        finished["finished"] = True
        await self.send(ws, record, finished)
        if not record.stalled:
            await ws.close()

    @staticmethod
    def _progress(
        recognizer: Recognizer, state: _State, tokens: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "tokens": tokens,
            "final_audio_proc_ms": state.final_ms,
            "total_audio_proc_ms": int(recognizer.received_ms),
        }

    async def _error(self, ws: ServerConnection, record: Record, code: int, message: str) -> None:
        await self.send(ws, record, {"error_code": code, "error_message": message})
        await ws.close()
