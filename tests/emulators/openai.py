"""An emulator of the OpenAI Realtime API's transcription sessions (GA protocol), from its docs.

What it implements, and where the docs say so:

* ``/v1/realtime?intent=transcription`` (no ``model``) opens a transcription
  session, ``/v1/realtime?model=gpt-realtime`` a speech-to-speech one;
  ``Authorization: Bearer <key>`` -
  https://developers.openai.com/api/docs/guides/realtime-transcription,
  https://developers.openai.com/api/docs/guides/realtime-websocket,
  https://www.w3cschool.cn/openai_api/openai_api-reference-resources-realtime-methods-connect.html
* a bad key: the upgrade is accepted, an ``error`` ``invalid_api_key`` is sent
  and the socket closed with code 3000 ``invalid_request_error.invalid_api_key``
  (as reported in
  https://github.com/twilio-samples/speech-assistant-openai-realtime-api-python/issues/4
  and https://github.com/openai/openai-realtime-api-beta/issues/2);
* ``session.created`` first; ``session.update`` whose ``session.type`` must
  match the connection (``transcription`` or ``realtime``), with
  ``audio.input.format`` (``audio/pcm``, rate 24000 only),
  ``audio.input.transcription`` (``model``, ``language``, ``prompt``) and
  ``audio.input.turn_detection`` (``server_vad``: ``threshold``,
  ``prefix_padding_ms``, ``silence_duration_ms``, ``create_response``,
  ``interrupt_response``), answered by ``session.updated`` with the effective
  configuration, or by ``error`` (``unknown_parameter`` for a field the API
  does not know, e.g. the beta's ``input_audio_format``) -
  https://developers.openai.com/api/reference/resources/realtime/client-events,
  https://developers.openai.com/api/reference/resources/realtime
* ``input_audio_buffer.append`` (base64 pcm16, no answer);
  ``input_audio_buffer.commit``: commits the buffer (the open speech, if
  any), or fails with ``input_audio_buffer_commit_empty`` when less than
  100 ms of audio is left -
  https://developers.openai.com/api/reference/resources/realtime/client-events,
  https://github.com/betalgo/openai/issues/674
* server VAD: ``input_audio_buffer.speech_started`` (``audio_start_ms``,
  ``item_id``), ``speech_stopped`` (``audio_end_ms``), ``committed``
  (``item_id``, ``previous_item_id``), ``conversation.item.added``; a commit
  during speech commits that item and sends no ``speech_stopped`` for it -
  https://developers.openai.com/api/reference/resources/realtime/server-events
* transcription runs asynchronously after each commit:
  ``conversation.item.input_audio_transcription.delta`` pieces, then
  ``.completed`` (``transcript``, ``usage``); it may finish after the next
  item's speech started (same page).
* errors: ``{"type": "error", "error": {"type", "code", "message", "param",
  "event_id"}}`` (same page); "Most errors are recoverable and the session
  will stay open" (same page): :attr:`OpenAIEmulator.error_after_ms` sends the
  page's example error mid-stream and goes on (or closes, with
  :attr:`OpenAIEmulator.close_after_error`).

Not from the docs (the emulator's own choices): only ``audio/pcm`` and
``server_vad`` are emulated; the audio format cannot change once audio
arrived; ``create_response`` true in a ``realtime`` session is recorded but no
response is generated; audio after the commit at the end is recorded but not
recognized.  A segment the recognizer closes within 50 ms of the audio's end
counts as committed by the client (no ``speech_stopped``).
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

PATH = "/v1/realtime"
RATE = 24000
TRANSCRIBERS = frozenset(
    {
        "whisper-1",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe-diarize",
        "gpt-realtime-whisper",
    }
)
REALTIME_MODELS = frozenset({"gpt-realtime", "gpt-realtime-mini"})
TRANSCRIPT_DELAY_S = 0.3
"""How long after a commit the transcript starts (it runs asynchronously)."""
DELTA_GAP_S = 0.02
MIN_COMMIT_MS = 100
FLUSH_TOLERANCE_MS = 50
NO_INTERIMS_MS = 10**9
"""gpt-4o-transcribe answers after the commit only: no decodes during speech."""

KNOWN = {
    "session": {"type", "audio", "include", "output_modalities", "model", "instructions"},
    "session.audio": {"input", "output"},
    "session.audio.input": {"format", "transcription", "turn_detection", "noise_reduction"},
    "session.audio.input.format": {"type", "rate"},
    "session.audio.input.transcription": {"model", "language", "prompt"},
    "session.audio.input.turn_detection": {
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "create_response",
        "interrupt_response",
        "idle_timeout_ms",
    },
}


class Invalid(Exception):
    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass
class _Session:
    kind: str
    model: str | None
    config: dict[str, Any] = field(default_factory=dict)
    recognizer: Recognizer | None = None
    answers: asyncio.Task[None] | None = None
    items: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    open_item: str | None = None
    previous_item: str | None = None
    last_end_ms: int = 0
    commit_at_ms: float | None = None
    commit_event_id: str | None = None
    commit_answered: bool = False
    error_sent: bool = False
    transcripts: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def input(self) -> dict[str, Any]:
        audio_input: dict[str, Any] = self.config["audio"]["input"]
        return audio_input


class OpenAIEmulator(Emulator):
    """OpenAI Realtime transcription on a local port."""

    path: ClassVar[str | None] = PATH
    auth_in_session: ClassVar[bool] = True  # refusals are error messages, not HTTP 401

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Clear this emulator's own knobs (the shared ones are in :attr:`faults`)."""
        self.auth_error_event = True
        """Send the ``invalid_api_key`` error before closing (else only the close)."""
        self.transcription_error: dict[str, Any] | None = None
        """Answer each commit with ``...transcription.failed`` carrying this error."""
        self.error_after_ms: float | None = None
        """Send one recoverable ``error`` once this much audio arrived, and go on."""
        self.close_after_error = False
        """Close the connection (1011) right after that error."""

    def authorized(self, request: Request) -> bool:
        scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and key == self.api_key

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "event_id": f"event_{next(self._event_ids)}", **fields}

    async def _error(
        self,
        ws: ServerConnection,
        record: Record,
        code: str,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        error = {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id,
        }
        await self.send(ws, record, self._event("error", error=error))

    async def session(self, ws: ServerConnection, record: Record) -> None:
        assert ws.request is not None
        if self.faults.reject_auth or not self.authorized(ws.request):
            if self.auth_error_event:
                refusal = "Incorrect API key provided: em***ey."
                await self._error(ws, record, "invalid_api_key", refusal)
            await ws.close(3000, "invalid_request_error.invalid_api_key")
            return
        state = self._open(record)
        if state is None:
            await self._error(
                ws,
                record,
                "invalid_model",
                "Use ?intent=transcription (without model) or ?model=<a realtime model>.",
                param="model",
            )
            await ws.close(1008, "invalid_request_error.invalid_model")
            return
        await self.send(ws, record, self._event("session.created", session=self._describe(state)))
        try:
            async for message in ws:
                if not isinstance(message, str):
                    await self._error(
                        ws, record, "invalid_value", "Binary frames are not accepted."
                    )
                    continue
                event = json.loads(message)
                record.text.append(event)
                await self._client_event(ws, record, state, event)
        finally:
            for task in [state.answers, *state.transcripts]:
                if task is not None:
                    task.cancel()
            if state.recognizer is not None:
                state.recognizer.close()

    def _open(self, record: Record) -> _Session | None:
        intent, model = record.param("intent"), record.param("model")
        if intent == "transcription" and model is None:
            state = _Session("transcription", None)
        elif intent in (None, "realtime") and model in REALTIME_MODELS:
            state = _Session("realtime", model)
        else:
            return None
        turn = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300}
        turn["silence_duration_ms"] = 500 if state.kind == "transcription" else 200
        state.config = {
            "type": state.kind,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": None,
                    "turn_detection": turn,
                    "noise_reduction": None,
                }
            },
        }
        return state

    def _describe(self, state: _Session) -> dict[str, Any]:
        session = {"object": "realtime.session", "id": "sess_emulated", **state.config}
        if state.model is not None:
            session["model"] = state.model
        return session

    async def _client_event(
        self, ws: ServerConnection, record: Record, state: _Session, event: dict[str, Any]
    ) -> None:
        kind = event.get("type")
        if kind == "session.update":
            try:
                self._update(state, event.get("session"))
            except Invalid as exc:
                await self._error(
                    ws,
                    record,
                    exc.code,
                    exc.message,
                    param=exc.param,
                    event_id=event.get("event_id"),
                )
                return
            await self.send(
                ws, record, self._event("session.updated", session=self._describe(state))
            )
        elif kind == "input_audio_buffer.append":
            try:
                pcm16 = base64.b64decode(event.get("audio", ""), validate=True)
            except binascii.Error:
                await self._error(ws, record, "invalid_value", "audio is not valid base64.")
                return
            if state.commit_at_ms is not None:
                record.audio_ms += len(pcm16) * 500 / RATE  # after the final commit: not heard
                return
            if state.recognizer is None:
                self._start(ws, record, state)
            assert state.recognizer is not None
            self.audio(ws, record, state.recognizer, pcm16)
            await self.pace(record)
            limit = self.error_after_ms
            if limit is not None and record.audio_ms >= limit and not state.error_sent:
                state.error_sent = True
                await self._recoverable_error(ws, record)
        elif kind == "input_audio_buffer.commit":
            record.finalized = True
            if await self.closed_on_finalize(ws):
                return
            if self.faults.ignore_finalize or state.commit_at_ms is not None:
                return
            if state.recognizer is None:
                self._start(ws, record, state)
            assert state.recognizer is not None
            state.commit_at_ms = state.recognizer.received_ms
            state.commit_event_id = event.get("event_id")
            state.recognizer.flush()
            state.recognizer.finish()
        else:
            await self._error(
                ws, record, "invalid_value", f"Invalid value: {kind!r}.", param="type"
            )

    async def _recoverable_error(self, ws: ServerConnection, record: Record) -> None:
        # The example of the `error` event on the server-events reference page:
        # https://developers.openai.com/api/reference/resources/realtime/server-events
        await self._error(
            ws, record, "invalid_event", "The 'type' field is missing.", event_id="event_567"
        )
        if self.close_after_error:
            await ws.close(1011, "server_error")

    def _update(self, state: _Session, session: Any) -> None:
        if not isinstance(session, dict):
            raise Invalid("missing_required_parameter", "Missing session.", "session")
        _check_known(session, "session")
        if session.get("type") != state.kind:
            raise Invalid(
                "invalid_value",
                f"This connection only accepts session.type {state.kind!r}.",
                "session.type",
            )
        audio_input = (session.get("audio") or {}).get("input") or {}
        fmt = audio_input.get("format")
        if fmt is not None:
            if fmt.get("type") != "audio/pcm" or fmt.get("rate", RATE) != RATE:
                raise Invalid(
                    "invalid_value",
                    "Only audio/pcm at 24000 Hz is emulated.",
                    "session.audio.input.format",
                )
            if state.recognizer is not None:
                raise Invalid(
                    "invalid_value",
                    "The format cannot change once audio arrived (emulator).",
                    "session.audio.input.format",
                )
        transcription = audio_input.get("transcription")
        if transcription is not None:
            if transcription.get("model") not in TRANSCRIBERS:
                raise Invalid(
                    "invalid_value",
                    f"Invalid value: {transcription.get('model')!r}.",
                    "session.audio.input.transcription.model",
                )
            for name in ("language", "prompt"):
                if not isinstance(transcription.get(name, ""), str):
                    raise Invalid(
                        "invalid_type",
                        f"{name} must be a string.",
                        f"session.audio.input.transcription.{name}",
                    )
        turn = audio_input.get("turn_detection", {})
        if turn is None or turn.get("type", "server_vad") != "server_vad":
            raise Invalid(
                "invalid_value",
                "Only server_vad is emulated.",
                "session.audio.input.turn_detection",
            )
        if not 0.0 <= float(turn.get("threshold", 0.5)) <= 1.0:
            raise Invalid(
                "decimal_above_max_value",
                "threshold must be between 0 and 1.",
                "session.audio.input.turn_detection.threshold",
            )
        merged = state.config["audio"]["input"]
        for key, value in audio_input.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        state.config |= {k: v for k, v in session.items() if k != "audio"}

    def _start(self, ws: ServerConnection, record: Record, state: _Session) -> None:
        turn = state.input["turn_detection"]
        state.recognizer = Recognizer(
            RATE,
            endpointing_ms=int(turn.get("silence_duration_ms", 500)),
            interim_every_ms=NO_INTERIMS_MS,
        )
        state.answers = asyncio.create_task(self._answer(ws, record, state))

    async def _answer(self, ws: ServerConnection, record: Record, state: _Session) -> None:
        assert state.recognizer is not None
        async for heard in state.recognizer.events():
            segment = heard.segment
            if heard.kind == "started":
                state.open_item = f"item_{next(state.items):03d}"
                await self.send(
                    ws,
                    record,
                    self._event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=segment.start_ms,
                        item_id=state.open_item,
                    ),
                )
            elif heard.kind == "final":
                item_id = state.open_item or f"item_{next(state.items):03d}"
                state.open_item = None
                at = state.commit_at_ms
                by_client = at is not None and segment.end_ms >= at - FLUSH_TOLERANCE_MS
                if not by_client:
                    await self.send(
                        ws,
                        record,
                        self._event(
                            "input_audio_buffer.speech_stopped",
                            audio_end_ms=segment.end_ms,
                            item_id=item_id,
                        ),
                    )
                state.commit_answered |= by_client
                await self._commit(ws, record, state, item_id, segment)
        if state.commit_at_ms is not None and not state.commit_answered:
            await self._final_commit(ws, record, state)

    async def _final_commit(self, ws: ServerConnection, record: Record, state: _Session) -> None:
        """The client's commit with no speech open: silence, or nothing at all."""
        assert state.commit_at_ms is not None
        left = state.commit_at_ms - state.last_end_ms
        if left < MIN_COMMIT_MS:
            await self._error(
                ws,
                record,
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {left:.2f}ms of audio.",
                event_id=state.commit_event_id,
            )
            return
        end = round(state.commit_at_ms)
        silence = Segment(state.last_end_ms, end)  # no words in it
        await self._commit(ws, record, state, f"item_{next(state.items):03d}", silence)

    async def _commit(
        self,
        ws: ServerConnection,
        record: Record,
        state: _Session,
        item_id: str,
        segment: Segment,
    ) -> None:
        previous = state.previous_item
        state.previous_item, state.last_end_ms = item_id, segment.end_ms
        await self.send(
            ws,
            record,
            self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
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
            self._event("conversation.item.added", previous_item_id=previous, item=item),
        )
        if state.input.get("transcription") is not None:
            task = asyncio.create_task(self._transcribe(ws, record, item_id, segment))
            state.transcripts.add(task)
            task.add_done_callback(state.transcripts.discard)

    async def _transcribe(
        self, ws: ServerConnection, record: Record, item_id: str, segment: Segment
    ) -> None:
        """The asynchronous transcription of one committed item: deltas, then completed."""
        await asyncio.sleep(TRANSCRIPT_DELAY_S)
        if self.transcription_error is not None:
            failed = self._event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error=self.transcription_error,
            )
            await self.send(ws, record, failed)
            return
        for n, word in enumerate(segment.words):
            delta = word.word if n == 0 else f" {word.word}"
            await self.send(
                ws,
                record,
                self._event(
                    "conversation.item.input_audio_transcription.delta",
                    item_id=item_id,
                    content_index=0,
                    delta=delta,
                ),
            )
            await asyncio.sleep(DELTA_GAP_S)
        seconds = max(0, segment.end_ms - segment.start_ms) / 1000
        await self.send(
            ws,
            record,
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=segment.text,
                usage={"type": "duration", "seconds": round(seconds, 3)},
            ),
        )


def _check_known(value: dict[str, Any], path: str) -> None:
    """The API refuses fields it does not know (``unknown_parameter``)."""
    known = KNOWN.get(path)
    if known is None:
        return
    for key, child in value.items():
        if key not in known:
            raise Invalid(
                "unknown_parameter", f"Unknown parameter: '{path}.{key}'.", f"{path}.{key}"
            )
        if isinstance(child, dict):
            _check_known(child, f"{path}.{key}")
