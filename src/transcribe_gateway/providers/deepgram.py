"""Deepgram live streaming: Nova-3 on ``/v1/listen``, Flux on ``/v2/listen``.

Both endpoints take the key in ``Authorization: Token <key>`` and raw
``linear16`` audio as binary frames, with the encoding and rate in the query.
Their answers differ enough to get one stream class each:

* **Nova-3** (:class:`NovaStream`) sends ``Results`` (``is_final`` pieces of an
  utterance, ``speech_final`` when its endpointer heard ``endpointing`` ms of
  silence), ``SpeechStarted`` (``vad_events``), ``UtteranceEnd``
  (``utterance_end_ms``) and, after ``CloseStream``, a ``Metadata`` summary
  before it closes.  It closes after 10 s without audio or a ``KeepAlive``
  text frame (NET-0001), so one goes out every 4 s of silence.  At the end the
  stream sends ``Finalize`` (flush what is buffered) then ``CloseStream``.
* **Flux** (:class:`FluxStream`) sends ``Connected`` then ``TurnInfo`` events
  (``StartOfTurn``, ``Update`` about every 0.25 s of audio, ``EagerEndOfTurn``,
  ``TurnResumed``, ``EndOfTurn``), each carrying the whole turn's transcript.
  ``CloseStream`` alone does not finalize the turn, so the stream sends
  ``ForceEndTurn`` first (ignored when no turn is open).  Flux has no KeepAlive
  message; WebSocket pings keep it open.  It wants 80 ms chunks.

Deepgram reports errors as a close frame with a code and a reason
(``1011 NET-0001``...), an HTTP status on the upgrade (401 bad key), or, on
Flux, an ``Error`` message.

Docs (checked for every detail above):
https://developers.deepgram.com/reference/streaming
https://developers.deepgram.com/docs/audio-keep-alive
https://developers.deepgram.com/docs/finalize
https://developers.deepgram.com/docs/close-stream
https://developers.deepgram.com/docs/speech-started
https://developers.deepgram.com/docs/utterance-end
https://developers.deepgram.com/documentation/guides/understand-endpointing-interim-results/
https://developers.deepgram.com/docs/keyterm
https://developers.deepgram.com/docs/stt-troubleshooting-websocket-data-and-net-errors
https://developers.deepgram.com/reference/speech-to-text/listen-flux
https://developers.deepgram.com/docs/flux/quickstart
https://developers.deepgram.com/docs/flux/state
https://developers.deepgram.com/docs/flux/close-stream
https://developers.deepgram.com/docs/flux/force-end-turn
https://github.com/orgs/deepgram/discussions/224 (20-250 ms of audio per message)
https://github.com/deepgram/deepgram-python-sdk/issues/649 (Flux: ping/pong keeps it open)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

from transcribe_gateway.providers.base import ModelInfo, StreamOptions, WordTiming
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame

NOVA = "nova-3"
FLUX = "flux-general-en"
RATE = 16000
"""Both models take any linear16 rate; 16 kHz is Deepgram's own example and enough for speech."""
UTTERANCE_END_MIN_MS = 1000
"""UtteranceEnd works on ~1 s interim results: shorter gaps are not detected."""


def keyterms(prompt: str | None) -> list[str]:
    """The session prompt as Deepgram keyterms (one per comma-separated item)."""
    return [term.strip() for term in (prompt or "").split(",") if term.strip()]


def _ms(seconds: Any) -> int:
    return round(float(seconds) * 1000)


def _words(items: Any, *, text_key: str = "word") -> tuple[WordTiming, ...]:
    """Deepgram word objects as ours (Flux words may lack times: those are skipped)."""
    words = []
    for item in items or ():
        if not isinstance(item, dict) or item.get("start") is None or item.get("end") is None:
            continue
        text = item.get(text_key) or item.get("word") or ""
        confidence = item.get("confidence")
        words.append(
            WordTiming(
                str(text),
                _ms(item["start"]),
                _ms(item["end"]),
                float(confidence) if confidence is not None else None,
            )
        )
    return tuple(words)


class _DeepgramStream(CloudStream):
    """What both endpoints share: the auth header and binary linear16 frames."""

    answers_continuously = True  # Results / Update messages flow while audio does

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.api_key}"}

    def audio_frame(self, pcm16: bytes) -> Frame:
        return pcm16  # encoding=linear16 in the query: little-endian pcm16 as is

    def _decode(self, message: Frame) -> dict[str, Any]:
        if isinstance(message, bytes):
            return {}
        try:
            data = json.loads(message)
        except ValueError as exc:
            raise self.fail(f"unreadable message: {message[:80]!r}") from exc
        return data if isinstance(data, dict) else {}


class NovaStream(_DeepgramStream):
    """Nova-3 on ``/v1/listen``: interim and final ``Results``, VAD events."""

    # Deepgram advises 20-250 ms of audio per message: a phone's or a browser's
    # 20 ms chunk goes on at once (50 ms frames held each event ~22 ms longer).
    chunk_ms = 20
    keepalive_interval_s = 4.0  # "send a KeepAlive every 3-5 seconds"; closed after 10 s

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._closing = False

    def url(self) -> str:
        o = self.options
        params = [
            ("model", o.model),
            ("encoding", "linear16"),
            ("sample_rate", str(o.sample_rate)),
            ("channels", "1"),
            ("language", o.language),
            ("interim_results", "true"),  # partials; UtteranceEnd needs them too
            ("punctuate", "true"),
            ("smart_format", "true"),
            ("endpointing", str(o.endpointing_ms)),
            ("utterance_end_ms", str(max(UTTERANCE_END_MIN_MS, o.endpointing_ms))),
            ("vad_events", "true"),  # SpeechStarted
        ]
        params += [("keyterm", term) for term in keyterms(o.prompt)]
        return f"{self.base_url}/v1/listen?{urlencode(params)}"

    def keepalive_frame(self) -> Frame:
        return json.dumps({"type": "KeepAlive"})  # a text frame, never binary

    def finalize_frames(self) -> Sequence[Frame]:
        self._closing = True
        # Finalize flushes buffered audio as final Results; CloseStream then sends
        # the Metadata summary and closes the socket.
        return [json.dumps({"type": "Finalize"}), json.dumps({"type": "CloseStream"})]

    async def on_message(self, message: Frame) -> bool:
        data = self._decode(message)
        kind = data.get("type")
        utterances = self.utterances
        if kind == "Results":
            await self._on_results(data)
        elif kind == "SpeechStarted":
            await utterances.speech_started(_ms(data.get("timestamp", 0)))
        elif kind == "UtteranceEnd":
            end = _ms(data.get("last_word_end", -1))
            end = end if end >= 0 else utterances.last_end_ms
            await utterances.complete(end)
            await utterances.speech_stopped(end)
        elif kind == "Metadata":
            return self._closing  # the summary after CloseStream: everything is final
        elif kind == "Error":
            reason = data.get("description") or data.get("message") or "unknown"
            raise self.fail(f"error {data.get('variant') or data.get('code') or ''}: {reason}")
        return False

    async def _on_results(self, data: dict[str, Any]) -> None:
        alternatives = (data.get("channel") or {}).get("alternatives") or [{}]
        best = alternatives[0]
        text = str(best.get("transcript") or "")
        start = _ms(data.get("start", 0))
        end = _ms(float(data.get("start", 0)) + float(data.get("duration", 0)))
        if not data.get("is_final"):
            await self.utterances.interim(text, start)
            return
        words = _words(best.get("words"), text_key="punctuated_word")
        await self.utterances.commit(text, start, end, words)
        if data.get("speech_final"):
            # The endpointer heard `endpointing` ms of silence: the utterance is over.
            stopped = words[-1].end_ms if words else end
            await self.utterances.complete(stopped)
            await self.utterances.speech_stopped(stopped)


class FluxStream(_DeepgramStream):
    """Flux on ``/v2/listen``: turn events, each with the whole turn so far."""

    chunk_ms = 80  # "80ms audio chunks strongly recommended"
    keepalive_interval_s = None  # no KeepAlive message on /v2: pings keep it open
    # After CloseStream Flux "closes the connection without sending a WebSocket
    # close status code" and no last message: that close is its "done".  (Nova
    # sends Metadata first, so a close before it is a failure there.)
    close_is_done = True

    def url(self) -> str:
        o = self.options
        params = [
            ("model", o.model),
            ("encoding", "linear16"),
            ("sample_rate", str(o.sample_rate)),
        ]
        params += [("keyterm", term) for term in keyterms(o.prompt)]
        return f"{self.base_url}/v2/listen?{urlencode(params)}"

    def finalize_frames(self) -> Sequence[Frame]:
        # CloseStream alone "does not finalize the active turn"; ForceEndTurn does
        # (EndOfTurn), and Flux then closes after CloseStream: that close is "done".
        return [json.dumps({"type": "ForceEndTurn"}), json.dumps({"type": "CloseStream"})]

    async def on_message(self, message: Frame) -> bool:
        data = self._decode(message)
        kind = data.get("type")
        if kind == "TurnInfo":
            await self._on_turn(data)
        elif kind == "Error":
            raise self.fail(f"error {data.get('code', '')}: {data.get('description', '')}")
        return False  # Connected, ConfigureSuccess...: nothing to report

    async def _on_turn(self, data: dict[str, Any]) -> None:
        event = data.get("event")
        text = str(data.get("transcript") or "")
        words = _words(data.get("words"))
        start = words[0].start_ms if words else _ms(data.get("audio_window_start", 0))
        end = words[-1].end_ms if words else _ms(data.get("audio_window_end", 0))
        utterances = self.utterances
        if event == "StartOfTurn":
            await utterances.speech_started(start)
            await utterances.interim(text, start)
        elif event in ("Update", "EagerEndOfTurn", "TurnResumed"):
            await utterances.interim(text, start)  # the turn's transcript so far
        elif event == "EndOfTurn":
            await utterances.commit(text, start, end, words)
            await utterances.complete(end)
            await utterances.speech_stopped(end)


class DeepgramSTT(CloudSTT):
    """Deepgram's hosted (or self-hosted, via ``DEEPGRAM_BASE_URL``) live streaming."""

    provider = "DEEPGRAM"
    default_base_url = "wss://api.deepgram.com"
    model_infos = (
        ModelInfo(
            NOVA,
            "Deepgram Nova-3, live streaming (/v1/listen); language=multi auto-detects",
            languages=None,
            input_rate=RATE,
            supports_vad=False,  # VAD events only: no threshold or padding to set
        ),
        ModelInfo(
            FLUX,
            "Deepgram Flux, turn-based streaming with model end-of-turn (/v2/listen)",
            languages=("en",),
            input_rate=RATE,
            # Flux ends turns on its own confidence (eot_threshold), not on a
            # silence length; eot_timeout_ms is a backstop of another meaning.
            supports_endpointing=False,
            supports_vad=False,
        ),
    )
    _streams: ClassVar[dict[str, type[CloudStream]]] = {NOVA: NovaStream, FLUX: FluxStream}
    stream_class = NovaStream

    async def open_stream(self, options: StreamOptions) -> CloudStream:
        stream = self._streams.get(options.model, NovaStream)(self, options)
        await stream.connect()
        stream.start()
        return stream
