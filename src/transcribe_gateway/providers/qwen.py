"""Qwen3-ASR-Flash-Realtime over Alibaba Cloud Model Studio's (DashScope) realtime WebSocket.

Protocol, as documented (checked against an emulator of these docs,
``tests/emulators/qwen.py``, not against the live service):

* ``wss://dashscope-intl.aliyuncs.com/api-ws/v1/realtime?model=<model>``
  (Beijing: ``wss://dashscope.aliyuncs.com``; set ``QWEN3_BASE_URL``), headers
  ``Authorization: Bearer <key>`` and ``OpenAI-Beta: realtime=v1``; a bad key
  fails the handshake with HTTP 401/403 -
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/client-events,
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/websocket-api,
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-interaction-process
* client events: ``session.update`` (``input_audio_format`` ``pcm``,
  ``sample_rate`` 16000/8000, ``input_audio_transcription.language`` and
  ``.corpus.text``, ``turn_detection`` ``server_vad`` with ``threshold`` and
  ``silence_duration_ms``), ``input_audio_buffer.append`` (base64 audio),
  ``session.finish`` -
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-client-events
* server events: ``session.created`` / ``session.updated``,
  ``input_audio_buffer.speech_started`` / ``speech_stopped`` (``audio_start_ms``
  / ``audio_end_ms``, ``item_id``), ``conversation.item.input_audio_transcription.text``
  (``text`` settled plus ``stash`` still changing), ``...completed``
  (``transcript``), ``session.finished``, ``error`` -
  https://www.alibabacloud.com/help/en/model-studio/qwen-asr-realtime-server-events,
  https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/server-events
* after ``session.finish`` the server completes the last utterance, sends
  ``session.finished``, and the client disconnects.

No keepalive message is documented, so idle connections rely on WebSocket
pings.  The server only speaks when it hears speech, so a silent provider is
not by itself a failure: an answer is expected after speech-level audio
(``speech_started`` due), after a long quiet inside an utterance
(``speech_stopped`` due) and after ``speech_stopped`` (its transcript due).
Transcripts carry no word timings.  ``vad.prefix_padding_ms`` and
``vad.min_speech_ms`` have no Qwen counterpart.

Qwen's VAD settings are not on our scales
(https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/python-sdk):
``threshold`` is "Default: 0.2. Recommended: 0.0. Range: [-1, 1]. Lower values
increase sensitivity", not a speech probability, so :func:`qwen_threshold`
maps ours onto it (our default leaves Qwen's own); ``silence_duration_ms``
takes [200, 6000], so ``endpointing`` is clamped into it (:func:`qwen_silence_ms`).

A ``speech_stopped`` arrives before its item's transcript; our
``speech.stopped`` is held until the item's final has been sent, so each
utterance reads started, partials, completed, stopped (docs/protocol.md).
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import (
    ModelInfo,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame, Utterances
from transcribe_gateway.providers.cloud_vad import LoudnessWatch

DEFAULT_THRESHOLD = StreamOptions(model="").vad_threshold
"""The gateway's ``vad.threshold`` when the client sets none (a speech probability)."""
QWEN_DEFAULT_THRESHOLD = 0.2
QWEN_THRESHOLD_RANGE = (-1.0, 1.0)
QWEN_SILENCE_RANGE_MS = (200, 6000)
"""``turn_detection.threshold`` and ``silence_duration_ms``: Qwen's default and ranges -
https://docs.qwencloud.com/api-reference/speech-recognition/qwen-asr-realtime/python-sdk"""


def qwen_threshold(threshold: float) -> float | None:
    """Our ``vad.threshold`` (a speech probability in [0, 1]) on Qwen's scale.

    Piecewise linear and increasing (higher is less sensitive on both scales):
    0 → -1, our default 0.5 → Qwen's default 0.2, 1 → 1.  Returns ``None`` for
    our default: the field is left out and Qwen applies its own.
    """
    low, high = QWEN_THRESHOLD_RANGE
    if threshold == DEFAULT_THRESHOLD:
        return None
    if threshold < DEFAULT_THRESHOLD:
        span = (QWEN_DEFAULT_THRESHOLD - low) / DEFAULT_THRESHOLD
    else:
        span = (high - QWEN_DEFAULT_THRESHOLD) / (1 - DEFAULT_THRESHOLD)
    mapped = QWEN_DEFAULT_THRESHOLD + (threshold - DEFAULT_THRESHOLD) * span
    return round(min(max(mapped, low), high), 3)


def qwen_silence_ms(endpointing_ms: int) -> int:
    """``endpointing`` clamped into the silence Qwen accepts."""
    low, high = QWEN_SILENCE_RANGE_MS
    return min(max(endpointing_ms, low), high)


@dataclass
class _Item:
    index: int
    start_ms: int
    vad: bool
    """Opened by ``speech_started`` (a ``speech_stopped`` will close it)."""
    end_ms: int | None = None
    partial: str = ""
    final: bool = False
    """Its transcript was handled (``FINAL`` sent if it had text)."""
    stopped: bool = False
    """Qwen's VAD stopped it (``speech_stopped``, at :attr:`end_ms`)."""
    closed: bool = False
    """Our ``SPEECH_STOPPED`` was sent (after the final)."""


class Items(Utterances):
    """Qwen's utterances by ``item_id``: a transcript may come after the next item began.

    Keeps the event invariants per utterance: started first, partials, one
    final (if any text), then stopped.  Qwen's ``speech_stopped`` comes before
    the item's transcript, so our ``SPEECH_STOPPED`` is held (with Qwen's
    ``audio_end_ms``) until the transcript is handled, or the stream ends.
    """

    def __init__(self, emit: Callable[[SpeechEvent], Awaitable[None]]) -> None:
        super().__init__(emit)
        self._items: dict[str, _Item] = {}
        self._numbers = itertools.count()

    @property
    def speaking(self) -> bool:
        return any(i.vad and not i.stopped for i in self._items.values())

    @property
    def awaiting_transcript(self) -> bool:
        return any(i.stopped and not i.final for i in self._items.values())

    async def started(self, item_id: str, start_ms: int) -> None:
        await self._open(item_id, start_ms, vad=True)

    async def show(self, item_id: str, text: str, at_ms: int) -> None:
        item = await self._open(item_id, at_ms, vad=False)
        text = text.strip()
        if item.final or not text or text == item.partial:
            return
        item.partial = text
        await self._emit(SpeechEvent(SpeechEventType.PARTIAL, item.index, text=text))

    async def stopped(self, item_id: str, end_ms: int) -> None:
        item = self._items.get(item_id)
        if item is None or item.stopped:
            return
        item.end_ms = end_ms
        item.stopped = True
        if item.final:  # its transcript came first
            await self._close(item, end_ms)
        self._retire(item_id)

    async def completed(self, item_id: str, transcript: str, at_ms: int) -> None:
        item = await self._open(item_id, at_ms, vad=False)
        await self._finalize(item, transcript.strip(), at_ms)
        if item.stopped:
            await self._close(item, item.end_ms if item.end_ms is not None else at_ms)
        elif not item.vad:  # no speech_stopped will come (manual commits)
            await self.stopped(item_id, item.end_ms or at_ms)
        self._retire(item_id)

    async def failed(self, item_id: str) -> None:
        """The item's transcription failed: close it if nothing of it was shown.

        With a partial shown, the session turns it into the final (and stops the
        utterance) when the stream fails, so nothing is sent here.
        """
        item = self._items.get(item_id)
        if item is None or item.final or item.partial:
            return
        item.final = True
        if item.stopped:
            await self._close(item, item.end_ms if item.end_ms is not None else item.start_ms)
        self._retire(item_id)

    async def flush(self, end_ms: int | None = None) -> None:
        """End of stream: what was shown becomes final, every item is closed."""
        for item_id, item in list(self._items.items()):
            at = end_ms if end_ms is not None else item.end_ms or item.start_ms
            await self._finalize(item, item.partial, at)
            stop = item.end_ms if item.stopped and item.end_ms is not None else at
            item.stopped = True
            await self._close(item, max(stop, item.start_ms))
            self._retire(item_id)

    async def _open(self, item_id: str, start_ms: int, *, vad: bool) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = _Item(next(self._numbers), start_ms, vad)
            self._items[item_id] = item
            await self._emit(
                SpeechEvent(SpeechEventType.SPEECH_STARTED, item.index, start_ms=start_ms)
            )
        return item

    async def _finalize(self, item: _Item, text: str, at_ms: int) -> None:
        if item.final:
            return
        item.final = True
        if text:
            end = max(item.end_ms or at_ms, item.start_ms)
            await self._emit(
                SpeechEvent(
                    SpeechEventType.FINAL, item.index, text=text, start_ms=item.start_ms, end_ms=end
                )
            )

    async def _close(self, item: _Item, end_ms: int) -> None:
        if not item.closed:
            item.closed = True
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, item.index, end_ms=end_ms))

    def _retire(self, item_id: str) -> None:
        item = self._items.get(item_id)
        if item is not None and item.final and item.closed:
            del self._items[item_id]


class QwenStream(CloudStream):
    chunk_ms: ClassVar[int] = 100  # the docs' example sends 3200 bytes (100 ms) per event
    keepalive_interval_s: ClassVar[float | None] = None  # no keepalive message documented
    answers_continuously: ClassVar[bool] = False

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self.items = Items(self._emit)
        self.utterances = self.items  # the base flushes it at the end
        self._ids = itertools.count(1)
        self.silence_ms = qwen_silence_ms(options.endpointing_ms)
        """The endpointing Qwen really applies (``endpointing`` clamped into its range)."""
        if self.silence_ms != options.endpointing_ms:
            self.log.info(
                "endpointing clamped into Qwen's range",
                extra={"requested_ms": options.endpointing_ms, "effective_ms": self.silence_ms},
            )
        self._loudness = LoudnessWatch(options.sample_rate, self.silence_ms)

    def url(self) -> str:
        return f"{self.base_url}/api-ws/v1/realtime?model={self.options.model}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "OpenAI-Beta": "realtime=v1"}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"event_id": f"event_{next(self._ids)}", "type": kind, **fields}

    def session_config(self) -> dict[str, Any]:
        options = self.options
        transcription: dict[str, Any] = {}
        language = options.language.split("-")[0].lower()
        if language and language != "multi":  # omitted: the model detects the language
            transcription["language"] = language
        if options.prompt:
            transcription["corpus"] = {"text": options.prompt}
        turn_detection: dict[str, Any] = {"type": "server_vad"}
        threshold = qwen_threshold(options.vad_threshold)
        if threshold is not None:
            turn_detection["threshold"] = threshold
        turn_detection["silence_duration_ms"] = self.silence_ms
        return {
            "input_audio_format": "pcm",
            "sample_rate": options.sample_rate,
            "input_audio_transcription": transcription,
            "turn_detection": turn_detection,
        }

    async def on_open(self) -> None:
        await self._await_event("session.created")
        await self.send_json(self.event("session.update", session=self.session_config()))
        await self._await_event("session.updated")

    async def _await_event(self, kind: str) -> dict[str, Any]:
        while True:  # bounded by connect()'s timeout
            event = json.loads(await self.receive())
            if event.get("type") == "error":
                raise self._error(event)
            if event.get("type") == kind:
                return dict(event)

    def audio_frame(self, pcm16: bytes) -> Frame:
        if self._loudness.process(pcm16, speaking=self.items.speaking):
            self.expect_answer()  # silent during silence: speech_started/stopped is due
        audio = base64.b64encode(pcm16).decode("ascii")
        return json.dumps(self.event("input_audio_buffer.append", audio=audio))

    def finalize_frames(self) -> Sequence[Frame]:
        return [json.dumps(self.event("session.finish"))]

    async def on_message(self, message: Frame) -> bool:
        event = json.loads(message)
        kind = event.get("type")
        item_id = str(event.get("item_id", ""))
        now = round(self.sent_ms)
        if kind == "error":
            raise self._error(event)
        if kind == "input_audio_buffer.speech_started":
            self.answered()
            self._loudness.reset()
            await self.items.started(item_id, int(event.get("audio_start_ms", now)))
        elif kind == "input_audio_buffer.speech_stopped":
            self.answered()
            await self.items.stopped(item_id, int(event.get("audio_end_ms", now)))
            self.expect_answer()  # its transcript is due
        elif kind == "conversation.item.input_audio_transcription.text":
            preview = str(event.get("text", "")) + str(event.get("stash", ""))
            await self.items.show(item_id, preview, now)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.answered()
            await self.items.completed(item_id, str(event.get("transcript", "")), now)
            if self.items.awaiting_transcript:
                self.expect_answer()
        elif kind == "conversation.item.input_audio_transcription.failed":
            await self.items.failed(item_id)
            raise self._error(event)
        elif kind == "session.finished":
            return True
        return False

    def _error(self, event: dict[str, Any]) -> ProviderError:
        error = event.get("error") or {}
        code = error.get("code") or error.get("type") or "error"
        return self.fail(f"{code}: {error.get('message', 'no message')}")


class QwenSTT(CloudSTT):
    provider: ClassVar[str] = "QWEN3"
    default_base_url: ClassVar[str] = "wss://dashscope-intl.aliyuncs.com"
    model_infos: ClassVar[tuple[ModelInfo, ...]] = (
        ModelInfo(
            "qwen3-asr-flash-realtime",
            "Qwen3-ASR-Flash realtime (multilingual, server VAD, context biasing)",
            input_rate=16000,
        ),
    )
    stream_class: ClassVar[type[CloudStream]] = QwenStream
