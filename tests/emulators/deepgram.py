"""An emulator of Deepgram live streaming, written from its public docs.

One server answers both endpoints, as api.deepgram.com does:

* ``/v1/listen`` (Nova): checks ``Authorization: Token <key>`` and the raw
  audio query (``encoding=linear16``, ``sample_rate``, ``channels=1``), takes
  binary audio, answers ``Results`` (interim with ``is_final: false``; final
  with word timings and confidence, ``speech_final`` at the endpoint,
  ``from_finalize`` after a ``Finalize``), ``SpeechStarted`` (``vad_events``),
  ``UtteranceEnd`` (``utterance_end_ms``), empty final ``Results`` for
  silence; counts ``KeepAlive``; on ``CloseStream`` flushes, sends the
  ``Metadata`` summary and closes 1000; closes ``1011 NET-0001`` after 10 s
  without audio or a text message.
* ``/v2/listen`` (Flux): sends ``Connected``, then ``TurnInfo`` events:
  ``StartOfTurn`` (always with a transcript), ``Update`` about every 0.25 s of
  audio, ``EndOfTurn`` with the turn's words; ``ForceEndTurn`` ends the open
  turn (ignored when none is); ``CloseStream`` decodes what it has, emits
  ``Update`` (not ``EndOfTurn``) and closes without a status code; fatal
  problems are an ``Error`` message ``{code, description}`` then a close.

Bad credentials get HTTP 401 with the ``dg-error`` header and a JSON body;
a bad query gets HTTP 400 the same way.

Docs:
https://developers.deepgram.com/reference/streaming
https://developers.deepgram.com/docs/audio-keep-alive
https://developers.deepgram.com/docs/finalize
https://developers.deepgram.com/docs/close-stream
https://developers.deepgram.com/docs/speech-started
https://developers.deepgram.com/docs/utterance-end
https://developers.deepgram.com/docs/stt-troubleshooting-websocket-data-and-net-errors
https://enterprise-docs.deepgram.com/guides/streaming/error-handling (close codes and payloads)
https://developers.deepgram.com/reference/speech-to-text/listen-flux
https://developers.deepgram.com/docs/flux/state
https://developers.deepgram.com/docs/flux/close-stream
https://developers.deepgram.com/docs/flux/force-end-turn
https://developers.deepgram.com/changelog/2026/7/2 (Flux word start/end)
Message shapes: deepgram-python-sdk src/deepgram/listen/v1/types/*.py and
src/deepgram/listen/v2/types/*.py (generated from Deepgram's API definition).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tests.emulators.recognizer import Recognizer, Segment, Word
from tests.emulators.server import Emulator, Faults, Record

IDLE_CLOSE_S = 10.0
"""NET-0001: no audio or text message within this window closes the stream."""
NET_0001 = (
    "Deepgram did not receive audio data or a text message within the timeout window. "
    "See https://dpgr.am/net0001"
)
DATA_0000 = "DATA-0000: The payload cannot be decoded as audio."
NOVA_MODELS = ("nova-3", "nova-2")
FLUX_MODELS = ("flux-general-en",)
FLUX_UPDATE_MS = 250
"""Flux sends an Update for about every 0.25 s of audio."""
FLUX_EOT_SILENCE_MS = 300
"""Silence after which the emulated Flux model ends the turn ("~260ms end-of-turn detection")."""
TICK_S = 0.25
INTERIM_EVERY_MS = 1500
"""How often the recognizer re-decodes open speech (Deepgram: about every second);
sparser than that, so finals are not queued behind hypotheses on a busy CPU."""


@dataclass
class DeepgramFaults(Faults):
    """The shared faults plus Deepgram's own failure message."""

    error_after_ms: float | None = None
    """After this much audio, fail the way Deepgram documents (Nova: close 1008
    DATA-0000; Flux: an ``Error`` message, then a close)."""


@dataclass
class _State:
    """What one connection's tasks share."""

    answered_ms: float = 0.0
    in_speech: bool = False
    silent: bool = False
    """The finalize is being ignored (Faults.ignore_finalize): never answer again."""
    from_finalize: bool = False
    closing: bool = False
    forced: bool = False
    turn_open: bool = False
    turn_index: int = 0
    turn_start_ms: int = 0
    words: list[Word] = field(default_factory=list)
    speech: Segment | None = None
    """Nova: the last interim hypothesis of the open segment."""
    sequence: int = 0
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _refusal(status: HTTPStatus, code: str, message: str) -> Response:
    request_id = str(uuid.uuid4())
    body = json.dumps({"err_code": code, "err_msg": message, "request_id": request_id})
    headers = Headers(
        [
            ("dg-request-id", request_id),
            ("dg-error", message),
            ("Content-Type", "application/json"),
        ]
    )
    return Response(status.value, status.phrase, headers, body.encode())


def _seconds(ms: float) -> float:
    return round(ms / 1000, 3)


class DeepgramEmulator(Emulator):
    """Deepgram's ``/v1/listen`` (Nova) and ``/v2/listen`` (Flux) on one port."""

    def authorized(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Token {self.api_key}"

    def refuse(self, request: Request) -> Response:
        return _refusal(HTTPStatus.UNAUTHORIZED, "INVALID_AUTH", "Invalid credentials.")

    async def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        refused = await super()._check(connection, request)
        if refused is not None:
            return refused
        problem = _query_problem(request.path)
        if problem is not None:
            return _refusal(HTTPStatus.BAD_REQUEST, "Bad Request", problem)
        return None

    @property
    def error_after_ms(self) -> float | None:
        return getattr(self.faults, "error_after_ms", None)

    async def session(self, ws: ServerConnection, record: Record) -> None:
        rate = int(record.param("sample_rate") or 0)
        if record.path == "/v2/listen":
            recognizer = Recognizer(
                rate, endpointing_ms=FLUX_EOT_SILENCE_MS, interim_every_ms=INTERIM_EVERY_MS
            )
            speak = self._flux_events
        else:
            recognizer = Recognizer(
                rate, endpointing_ms=_endpointing_ms(record), interim_every_ms=INTERIM_EVERY_MS
            )
            speak = self._nova_events
        state = _State()
        if record.path == "/v2/listen":
            await self._say(ws, record, state, {"type": "Connected"})
        tasks = [
            asyncio.create_task(speak(ws, record, recognizer, state)),
            asyncio.create_task(self._tick(ws, record, recognizer, state)),
        ]
        try:
            await self._read(ws, record, recognizer, state, tasks[0])
        finally:
            for task in tasks:
                task.cancel()
            recognizer.close()

    # -- what the client sends ---------------------------------------------------

    async def _read(
        self,
        ws: ServerConnection,
        record: Record,
        recognizer: Recognizer,
        state: _State,
        speaker: asyncio.Task[None],
    ) -> None:
        flux = record.path == "/v2/listen"
        while True:
            try:
                async with asyncio.timeout(IDLE_CLOSE_S):
                    message = await ws.recv()
            except TimeoutError:
                await ws.close(1011, NET_0001)
                return
            except ConnectionClosed:
                record.closed_by_client = True
                return
            if isinstance(message, bytes):
                record.binary_frames += 1
                self.audio(ws, record, recognizer, message)
                await self.pace(record)
                failing_at = self.error_after_ms
                if failing_at is not None and record.audio_ms >= failing_at:
                    await self._fail(ws, record, state)
                    return
                continue
            payload = json.loads(message)
            record.text.append(payload)
            kind = payload.get("type")
            if kind == "KeepAlive" and not flux:
                record.keepalives += 1  # no answer: "the server will not send a response"
            elif kind == "Finalize" and not flux:
                record.finalized = True
                if await self.closed_on_finalize(ws):
                    return
                if self.faults.ignore_finalize:
                    state.silent = True
                else:
                    state.from_finalize = True
                    recognizer.flush()
            elif kind == "ForceEndTurn" and flux:
                record.finalized = True
                if await self.closed_on_finalize(ws):
                    return
                if self.faults.ignore_finalize:
                    state.silent = True
                elif state.in_speech or state.turn_open:  # else: no turn, ignored
                    state.forced = True
                    recognizer.flush()
            elif kind == "CloseStream":
                record.finalized = True
                if await self.closed_on_finalize(ws):
                    return
                if self.faults.ignore_finalize:
                    state.silent = True
                    continue  # never answer, never close: the client must give up
                await self._close_stream(ws, record, recognizer, state, speaker)
                return
            else:
                await self._say(
                    ws,
                    record,
                    state,
                    {
                        "type": "Error",
                        "variant": "SchemaError",
                        "description": f"unknown message type {kind!r}",
                        "message": message,
                    },
                )

    async def _close_stream(
        self,
        ws: ServerConnection,
        record: Record,
        recognizer: Recognizer,
        state: _State,
        speaker: asyncio.Task[None],
    ) -> None:
        state.closing = True
        recognizer.flush()
        recognizer.finish()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(speaker, 60)
        if record.path == "/v2/listen":
            # "the server closes the connection without sending a WebSocket close status code"
            await ws.close(None)  # type: ignore[arg-type]
            return
        await self._say(
            ws,
            record,
            state,
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": state.request_id,
                "sha256": "0" * 64,
                "created": datetime.datetime.now(datetime.UTC).isoformat(),
                "duration": _seconds(record.audio_ms),
                "channels": 1,
            },
        )
        await ws.close(1000)

    async def _fail(self, ws: ServerConnection, record: Record, state: _State) -> None:
        if record.path == "/v2/listen":
            error = {
                "type": "Error",
                "code": "INTERNAL_SERVER_ERROR",
                "description": "The emulated model crashed.",
            }
            await self._say(ws, record, state, error)
            await ws.close(1011, "INTERNAL_SERVER_ERROR")
        else:
            await ws.close(1008, DATA_0000)

    # -- what the provider answers -------------------------------------------------

    async def _say(
        self, ws: ServerConnection, record: Record, state: _State, payload: dict[str, Any]
    ) -> None:
        if state.silent:
            return
        if record.path == "/v2/listen":
            payload = {**payload, "request_id": state.request_id, "sequence_id": state.sequence}
            state.sequence += 1
        await self.send(ws, record, payload)

    async def _tick(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, state: _State
    ) -> None:
        """Answer all received audio, speech or not (both models stream results for it)."""
        flux = record.path == "/v2/listen"
        interim = record.param("interim_results") == "true"
        step = FLUX_UPDATE_MS if flux else 20
        while True:
            await asyncio.sleep(TICK_S)
            received = recognizer.received_ms
            if received - state.answered_ms < step or state.closing:
                continue
            start, state.answered_ms = state.answered_ms, received
            if flux:
                await self._turn(ws, record, state, "Update", start, received)
            elif state.in_speech and state.speech is not None and interim:
                # Still decoding: repeat the current hypothesis over the longer window.
                speech = Segment(state.speech.start_ms, round(received), state.speech.words)
                await self._results(ws, record, state, speech, final=False)
            elif not state.in_speech:
                await self._results(ws, record, state, Segment(round(start), round(received)))

    async def _results(
        self,
        ws: ServerConnection,
        record: Record,
        state: _State,
        segment: Segment,
        *,
        final: bool = True,
        endpoint: bool = False,
    ) -> None:
        words = [
            {
                "word": w.word.strip(".,?!;:").lower(),
                "start": _seconds(w.start_ms),
                "end": _seconds(w.end_ms),
                "confidence": round(w.probability, 4),
                "punctuated_word": w.word,
                "language": "en",
            }
            for w in segment.words
        ]
        confidence = min((w.probability for w in segment.words), default=0.0)
        message: dict[str, Any] = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": _seconds(segment.end_ms - segment.start_ms),
            "start": _seconds(segment.start_ms),
            "is_final": final,
            "speech_final": endpoint,
            "channel": {
                "alternatives": [
                    {"transcript": segment.text, "confidence": confidence, "words": words}
                ]
            },
            "metadata": {
                "request_id": state.request_id,
                "model_info": {"name": record.param("model"), "version": "emulated", "arch": ""},
                "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, str(record.param("model")))),
            },
        }
        if final and state.from_finalize:
            message["from_finalize"] = True
        await self._say(ws, record, state, message)

    async def _nova_events(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, state: _State
    ) -> None:
        interim = record.param("interim_results") == "true"
        vad_events = record.param("vad_events") == "true"
        utterance_end = record.param("utterance_end_ms") is not None
        async for heard in recognizer.events():
            segment = heard.segment
            if heard.kind == "started":
                state.in_speech = True
                state.speech = segment
                if vad_events:
                    speech = {
                        "type": "SpeechStarted",
                        "channel": [0],
                        "timestamp": _seconds(segment.start_ms),
                    }
                    await self._say(ws, record, state, speech)
            elif heard.kind == "interim" and interim:
                state.speech = segment
                await self._results(ws, record, state, segment, final=False)
            elif heard.kind == "final":
                # A flushed segment is final without an endpoint (Finalize / CloseStream).
                endpoint = not (state.from_finalize or state.closing)
                await self._results(ws, record, state, segment, endpoint=endpoint)
                state.answered_ms = max(state.answered_ms, segment.end_ms)
            elif heard.kind == "stopped":
                state.in_speech = False
                state.speech = None
                if utterance_end and segment.words:
                    end = {
                        "type": "UtteranceEnd",
                        "channel": [0, 1],
                        "last_word_end": _seconds(segment.words[-1].end_ms),
                    }
                    await self._say(ws, record, state, end)

    async def _flux_events(
        self, ws: ServerConnection, record: Record, recognizer: Recognizer, state: _State
    ) -> None:
        async for heard in recognizer.events():
            segment = heard.segment
            if heard.kind == "started":
                state.in_speech = True
                state.turn_start_ms = segment.start_ms
            elif heard.kind == "stopped":
                state.in_speech = False
            elif heard.kind in ("interim", "final") and segment.words:
                state.words = list(segment.words)
                end = segment.end_ms
                if not state.turn_open:
                    # "every StartOfTurn is guaranteed to contain a non-empty transcript"
                    state.turn_open = True
                    await self._turn(ws, record, state, "StartOfTurn", segment.start_ms, end)
                if heard.kind == "interim":
                    await self._turn(ws, record, state, "Update", segment.start_ms, end)
                elif state.closing and not state.forced:
                    # CloseStream "does not finalize the active turn": a last Update.
                    await self._turn(ws, record, state, "Update", segment.start_ms, end)
                else:
                    await self._turn(ws, record, state, "EndOfTurn", segment.start_ms, end)
                    state.turn_open = False
                    state.turn_index += 1
                    state.words = []

    async def _turn(
        self,
        ws: ServerConnection,
        record: Record,
        state: _State,
        event: str,
        start_ms: float,
        end_ms: float,
    ) -> None:
        words = state.words if state.turn_open or event == "EndOfTurn" else []
        message = {
            "type": "TurnInfo",
            "event": event,
            "turn_index": state.turn_index,
            "audio_window_start": _seconds(start_ms),
            "audio_window_end": _seconds(end_ms),
            "transcript": " ".join(w.word for w in words),
            "words": [
                {
                    "word": w.word,
                    "confidence": round(w.probability, 4),
                    "start": _seconds(w.start_ms),
                    "end": _seconds(w.end_ms),
                }
                for w in words
            ],
            "end_of_turn_confidence": 0.9 if event == "EndOfTurn" else 0.1,
        }
        if event == "EndOfTurn":
            message["trigger"] = "manual" if state.forced else "model"
        await self._say(ws, record, state, message)


def _endpointing_ms(record: Record) -> int:
    """Nova's endpointing: ``false`` disables it, the default is 10 ms."""
    value = record.param("endpointing")
    if value is None:
        return 10
    if value == "false":
        return 10_000
    return max(10, int(value))


def _query_problem(path: str) -> str | None:
    """Why Deepgram would refuse this upgrade with HTTP 400, if it would."""
    parts = urlsplit(path)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    model = query.get("model", "")
    if parts.path == "/v1/listen":
        if model not in NOVA_MODELS:
            return f"model {model!r} is not served on /v1/listen"
        if query.get("channels", "1") != "1":
            return "the emulator only takes mono audio"
    elif parts.path == "/v2/listen":
        if model not in FLUX_MODELS:
            return f"Flux requires a Flux model on /v2/listen, not {model!r}"
    else:
        return f"no such endpoint {parts.path}"
    # Raw audio needs both; the emulator takes nothing else (no containers).
    if query.get("encoding") != "linear16":
        return "encoding must be linear16 for raw audio"
    if not query.get("sample_rate", "").isdigit():
        return "sample_rate is required for raw audio"
    return None
