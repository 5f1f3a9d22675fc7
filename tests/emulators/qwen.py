"""An emulator of Qwen-ASR-Realtime (Alibaba Cloud Model Studio / DashScope), from its public docs.

What it implements, and where the docs say so:

* ``/api-ws/v1/realtime?model=<model>``, ``Authorization: Bearer <key>``
  checked during the handshake (a bad key: HTTP 401), ``OpenAI-Beta:
  realtime=v1`` recorded -
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/websocket-api,
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/client-events
* ``session.created`` first; ``session.update`` (``input_audio_format`` pcm,
  ``sample_rate`` 16000/8000, ``input_audio_transcription.language`` /
  ``.corpus.text``, ``turn_detection`` ``server_vad`` or null) answered by
  ``session.updated`` or ``error``; ``input_audio_buffer.append`` with base64
  audio and no answer; ``input_audio_buffer.commit`` in manual mode only;
  ``session.finish`` -
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-client-events
* in VAD mode: ``input_audio_buffer.speech_started``, realtime
  ``conversation.item.input_audio_transcription.text`` (``text`` settled,
  ``stash`` still changing), then ``speech_stopped``, ``committed``,
  ``conversation.item.created``, ``...completed`` (``transcript``); after
  ``session.finish`` the last utterance is completed, then ``session.finished``
  (the client disconnects) -
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-interaction-process,
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-server-events
* errors: ``{"type": "error", "error": {"type", "code", "message", "param",
  "event_id"}}`` (same page).
* ``turn_detection.threshold``: "Default: 0.2. Recommended: 0.0. Range: [-1,
  1]"; ``silence_duration_ms``: "Default: 800. Recommended: 400. Range: [200,
  6000]"; a value outside is refused with an ``error`` -
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/python-sdk

Not from the docs (the emulator's own choices): an unknown model or event type
is answered with an ``invalid_request_error``; audio other than pcm is not
emulated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from tests.emulators.recognizer import Recognizer, Segment
from tests.emulators.server import Emulator, Record

INTERIM_EVERY_MS = 1500
"""Audio between interim decodes: fewer decodes keep finals prompt on a busy CPU."""
PATH = "/api-ws/v1/realtime"
THRESHOLD_RANGE = (-1.0, 1.0)
SILENCE_RANGE_MS = (200, 6000)
MODELS = frozenset({"qwen3-asr-flash-realtime", "qwen3-asr-flash-realtime-2025-10-27"})
LANGUAGES = frozenset(
    [
        "zh",
        "yue",
        "en",
        "ja",
        "de",
        "ko",
        "ru",
        "fr",
        "pt",
        "ar",
        "it",
        "es",
        "hi",
        "id",
        "th",
        "tr",
        "uk",
        "vi",
        "cs",
        "da",
        "fil",
        "fi",
        "is",
        "ms",
        "no",
        "pl",
        "sv",
    ]
)


@dataclass
class _Session:
    """The session configuration as the server holds it."""

    config: dict[str, Any] = field(
        default_factory=lambda: {
            "input_audio_format": "pcm",
            "sample_rate": 16000,
            "input_audio_transcription": None,
            "turn_detection": {"type": "server_vad", "threshold": 0.2, "silence_duration_ms": 800},
        }
    )
    recognizer: Recognizer | None = None
    items: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    item_id: str = ""
    previous_item_id: str | None = None

    @property
    def vad(self) -> bool:
        return self.config.get("turn_detection") is not None


class QwenEmulator(Emulator):
    """``qwen3-asr-flash-realtime`` on a local port."""

    path: ClassVar[str | None] = PATH

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_ids = itertools.count(1)

    def authorized(self, request: Request) -> bool:
        scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and key == self.api_key

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"event_id": f"event_{next(self._event_ids)}", "type": kind, **fields}

    async def _error(
        self,
        ws: ServerConnection,
        record: Record,
        message: str,
        *,
        param: str = "",
        code: str = "invalid_value",
    ) -> None:
        error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
        await self.send(ws, record, self._event("error", error=error))

    async def session(self, ws: ServerConnection, record: Record) -> None:
        model = (record.query.get("model") or [""])[-1]
        state = _Session()
        if model not in MODELS:
            await self._error(ws, record, f"Model not found: {model!r}.", param="model")
            await ws.close()
            return
        await self.send(
            ws, record, self._event("session.created", session=self._describe(state, model))
        )
        answers: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                if not isinstance(message, str):
                    await self._error(ws, record, "Binary frames are not accepted.")
                    continue
                event = json.loads(message)
                record.text.append(event)
                kind = event.get("type")
                if kind == "session.update":
                    if await self._update(ws, record, state, event, model) and answers is None:
                        answers = asyncio.create_task(self._answer(ws, record, state))
                elif kind == "input_audio_buffer.append":
                    if state.recognizer is None:  # no session.update: the defaults apply
                        state.recognizer = self._recognizer(state)
                        answers = asyncio.create_task(self._answer(ws, record, state))
                    try:
                        pcm16 = base64.b64decode(event.get("audio", ""), validate=True)
                    except binascii.Error:
                        await self._error(ws, record, "audio is not valid base64.", param="audio")
                        continue
                    self.audio(ws, record, state.recognizer, pcm16)
                    await self.pace(record)
                elif kind == "input_audio_buffer.commit":
                    if state.vad:
                        await self._error(ws, record, "commit is disabled in VAD mode.")
                    elif state.recognizer is not None:
                        state.recognizer.flush()
                elif kind == "session.finish":
                    record.finalized = True
                    if await self.closed_on_finalize(ws):
                        return
                    if self.faults.ignore_finalize:
                        continue
                    if state.recognizer is None:
                        await self.send(ws, record, self._event("session.finished"))
                    else:
                        state.recognizer.flush()
                        state.recognizer.finish()
                else:
                    await self._error(ws, record, f"Unknown event type {kind!r}.", param="type")
        finally:
            if answers is not None:
                answers.cancel()
            if state.recognizer is not None:
                state.recognizer.close()

    async def _update(
        self,
        ws: ServerConnection,
        record: Record,
        state: _Session,
        event: dict[str, Any],
        model: str,
    ) -> bool:
        session = event.get("session") or {}
        problem = self._problem(session)
        if problem is not None:
            await self._error(ws, record, problem[1], param=f"session.{problem[0]}")
            return False
        if state.recognizer is not None:
            await self._error(
                ws, record, "the audio configuration cannot change mid-session (emulator)"
            )
            return False
        state.config.update(session)
        state.recognizer = self._recognizer(state)
        await self.send(
            ws, record, self._event("session.updated", session=self._describe(state, model))
        )
        return True

    @staticmethod
    def _problem(session: dict[str, Any]) -> tuple[str, str] | None:
        if session.get("input_audio_format", "pcm") != "pcm":
            return "input_audio_format", "Only pcm is emulated (the service also takes opus)."
        if session.get("sample_rate", 16000) not in (16000, 8000):
            return "sample_rate", "Supported values are: 16000, 8000."
        transcription = session.get("input_audio_transcription") or {}
        language = transcription.get("language")
        if language is not None and language not in LANGUAGES:
            return "input_audio_transcription.language", f"Invalid value: {language!r}."
        corpus = transcription.get("corpus")
        if corpus is not None and not isinstance(corpus.get("text"), str):
            return "input_audio_transcription.corpus.text", "corpus.text must be a string."
        turn = session.get("turn_detection", {})
        if turn is not None:
            if turn.get("type", "server_vad") != "server_vad":
                return "turn_detection.type", "Supported values are: 'server_vad'."
            threshold = turn.get("threshold", 0.2)
            if not isinstance(threshold, (int, float)):
                return "turn_detection.threshold", "threshold must be a number."
            if not THRESHOLD_RANGE[0] <= threshold <= THRESHOLD_RANGE[1]:
                return "turn_detection.threshold", "threshold must be in [-1, 1]."
            silence = turn.get("silence_duration_ms", 800)
            if not isinstance(silence, int):
                return (
                    "turn_detection.silence_duration_ms",
                    "silence_duration_ms must be an integer.",
                )
            if not SILENCE_RANGE_MS[0] <= silence <= SILENCE_RANGE_MS[1]:
                return (
                    "turn_detection.silence_duration_ms",
                    "silence_duration_ms must be in [200, 6000].",
                )
        return None

    @staticmethod
    def _recognizer(state: _Session) -> Recognizer:
        turn = state.config.get("turn_detection") or {}
        return Recognizer(
            int(state.config["sample_rate"]),
            endpointing_ms=int(turn.get("silence_duration_ms", 800)),
            interim_every_ms=INTERIM_EVERY_MS,
        )

    @staticmethod
    def _describe(state: _Session, model: str) -> dict[str, Any]:
        return {
            "id": "sess_emulated",
            "object": "realtime.session",
            "model": model,
            "modalities": ["text"],
            "input_audio_format": "pcm16",
            **{k: v for k, v in state.config.items() if k != "input_audio_format"},
        }

    async def _answer(self, ws: ServerConnection, record: Record, state: _Session) -> None:
        assert state.recognizer is not None
        async for heard in state.recognizer.events():
            segment = heard.segment
            if heard.kind == "started" and state.vad:
                state.item_id = f"item_{next(state.items)}"
                await self.send(
                    ws,
                    record,
                    self._event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=segment.start_ms,
                        item_id=state.item_id,
                    ),
                )
            elif heard.kind == "interim" and state.vad:
                await self.send(ws, record, self._text(state, segment, settled=False))
            elif heard.kind == "final":
                await self._complete(ws, record, state, segment)
        await self.send(ws, record, self._event("session.finished"))

    def _text(self, state: _Session, segment: Segment, *, settled: bool) -> dict[str, Any]:
        words = [w.word for w in segment.words]
        keep = len(words) if settled else max(0, len(words) - 2)
        text = " ".join(words[:keep])
        stash = " ".join(words[keep:])
        if text and stash:
            stash = " " + stash
        return self._event(
            "conversation.item.input_audio_transcription.text",
            item_id=state.item_id,
            content_index=0,
            language="en",
            emotion="neutral",
            text=text,
            stash=stash,
        )

    async def _complete(
        self, ws: ServerConnection, record: Record, state: _Session, segment: Segment
    ) -> None:
        if state.vad:
            await self.send(
                ws,
                record,
                self._event(
                    "input_audio_buffer.speech_stopped",
                    audio_end_ms=segment.end_ms,
                    item_id=state.item_id,
                ),
            )
        else:
            state.item_id = f"item_{next(state.items)}"
        item_id = state.item_id
        await self.send(
            ws,
            record,
            self._event(
                "input_audio_buffer.committed",
                previous_item_id=state.previous_item_id,
                item_id=item_id,
            ),
        )
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self.send(
            ws,
            record,
            self._event(
                "conversation.item.created", previous_item_id=state.previous_item_id, item=item
            ),
        )
        await self.send(ws, record, self._text(state, segment, settled=True))
        await self.send(
            ws,
            record,
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                language="en",
                emotion="neutral",
                transcript=segment.text,
            ),
        )
        state.previous_item_id = item_id
