"""OpenAI Realtime API transcription over WebSocket (the GA protocol).

Protocol, as documented (checked against an emulator of these docs,
``tests/emulators/openai.py``, not against the live service):

* ``wss://api.openai.com/v1/realtime?intent=transcription`` (no ``model`` in
  the URL) opens a transcription session; ``?model=gpt-realtime`` opens a
  speech-to-speech session; ``Authorization: Bearer <key>``; no ``OpenAI-Beta``
  header (that was the beta) -
  https://developers.openai.com/api/docs/guides/realtime-transcription,
  https://developers.openai.com/api/docs/guides/realtime-websocket,
  https://www.w3cschool.cn/openai_api/openai_api-reference-resources-realtime-methods-connect.html
  (a mirror of the ``connect`` reference: ``intent`` is ``realtime`` or ``transcription``)
* ``session.created`` first; ``session.update`` with ``session.type``
  ``"transcription"`` (or ``"realtime"``) and ``audio.input.format``
  (``audio/pcm`` at 24000 Hz), ``audio.input.transcription`` (``model``,
  ``language`` ISO-639-1, ``prompt``) and ``audio.input.turn_detection``
  (``server_vad``: ``threshold``, ``prefix_padding_ms``, ``silence_duration_ms``;
  for ``realtime`` also ``create_response``/``interrupt_response``, both false
  so the model never answers), answered by ``session.updated`` -
  https://developers.openai.com/api/reference/resources/realtime/client-events,
  https://developers.openai.com/api/reference/resources/realtime
* ``input_audio_buffer.append`` (base64 pcm16), ``input_audio_buffer.commit``
  (errors when the buffer is empty; with server VAD the server commits by itself) -
  https://developers.openai.com/api/reference/resources/realtime/client-events
* server events: ``input_audio_buffer.speech_started`` (``audio_start_ms``,
  ``item_id``), ``speech_stopped`` (``audio_end_ms``), ``committed``
  (``item_id``, ``previous_item_id``),
  ``conversation.item.input_audio_transcription.delta`` / ``.completed`` /
  ``.failed`` keyed by ``item_id`` (transcription runs asynchronously, so a
  transcript may come after the next item's speech started), ``error`` -
  https://developers.openai.com/api/reference/resources/realtime/server-events

We use the GA protocol (``session.update`` with ``type: "transcription"``), not
the beta's ``transcription_session.update``/``OpenAI-Beta: realtime=v1``, which
OpenAI deprecated.  ``gpt-realtime`` is a speech-to-speech model: its input is
transcribed by a separate ASR model (``audio.input.transcription.model``), so
a ``gpt-realtime`` session here is a realtime session with text output,
``create_response: false`` and ``gpt-4o-transcribe`` as the transcriber.

An ``error`` during the handshake fails the connection.  Later ones do not
end the stream: "Most errors are recoverable and the session will stay open"
(server-events page above), so each is logged as a warning and the stream
goes on; if the server then closes, the stream fails naming that error.  Two
errors after the handshake are not of that kind: the empty-buffer answer to
our final commit (nothing was left to flush: done), and any other error
answering that commit (the finalize cannot complete: failed at once).

A bad key is not refused at the upgrade: the server sends an ``error``
``invalid_api_key`` and closes with code 3000 (seen in
https://github.com/twilio-samples/speech-assistant-openai-realtime-api-python/issues/4);
both are reported as an authentication failure.  No keepalive message exists:
WebSocket pings keep the connection.  OpenAI says nothing during silence, so an
answer is only expected where one is due: after speech-level audio
(``speech_started``), after a long quiet inside speech (``speech_stopped``),
after ``speech_stopped``/``committed`` (the transcript).  At the end of input
``input_audio_buffer.commit`` flushes the open speech; the stream is done when
that commit is acknowledged (``committed``, or the empty-buffer error) and
every committed item has its transcript.  Transcripts carry no word timings.
An item's ``speech_stopped`` comes before its transcript; our
``speech.stopped`` waits for the item's final (see :class:`Items`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from websockets.exceptions import ConnectionClosed

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import (
    ModelInfo,
    SpeechEvent,
    SpeechEventType,
    StreamOptions,
)
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame, Utterances
from transcribe_gateway.providers.cloud_vad import LoudnessWatch

RATE = 24000
"""The only rate OpenAI takes for ``audio/pcm``."""
REALTIME_TRANSCRIBER = "gpt-4o-transcribe"
"""The ASR model that transcribes a ``gpt-realtime`` session's input."""
COMMIT_EMPTY = "input_audio_buffer_commit_empty"
FINAL_COMMIT = "final_commit"
"""``event_id`` of the commit at the end of input (an ``error`` names the event it answers)."""


@dataclass
class _Item:
    """One OpenAI conversation item (one turn of input audio)."""

    start_ms: int | None = None
    end_ms: int | None = None
    index: int | None = None
    """Our utterance number, once announced with ``SPEECH_STARTED``."""
    text: str = ""
    speaking: bool = False
    """Opened by ``speech_started``, not yet stopped or committed."""
    stopped: bool = False
    """OpenAI's VAD stopped it (``speech_stopped``, at :attr:`end_ms`)."""
    committed: bool = False
    done: bool = False
    """Its transcript arrived (or failed, or the stream ended)."""
    closed: bool = False
    """Our ``SPEECH_STOPPED`` was sent (after the final)."""


class Items(Utterances):
    """OpenAI's items as our utterances, numbered in the order their speech began.

    Keeps the event invariants per utterance even when a transcript arrives
    after the next item started: started first, partials (the whole item so
    far), one final if there is text, then stopped.  OpenAI's
    ``speech_stopped`` comes before the item's transcript (transcription
    starts at the commit that follows it), so our ``SPEECH_STOPPED`` is held,
    with OpenAI's ``audio_end_ms``, until the transcript is handled or the
    stream ends: docs/protocol.md promises started, partials, completed,
    stopped.
    """

    def __init__(self, emit: Callable[[SpeechEvent], Awaitable[None]]) -> None:
        super().__init__(emit)
        self._items: dict[str, _Item] = {}
        self._finished: set[str] = set()
        self._last_end = 0

    @property
    def speaking(self) -> bool:
        return any(i.speaking for i in self._items.values())

    @property
    def pending(self) -> bool:
        """Whether a committed item still awaits its transcript."""
        return any(i.committed and not i.done for i in self._items.values())

    async def started(self, item_id: str, start_ms: int) -> None:
        item = self._get(item_id)
        item.start_ms, item.speaking = start_ms, True
        await self._announce(item, start_ms)

    async def stopped(self, item_id: str, end_ms: int) -> None:
        item = self._get(item_id)
        item.end_ms, item.speaking, item.stopped = end_ms, False, True
        self._last_end = max(self._last_end, end_ms)
        if item.done:  # its transcript came first
            await self._close(item, end_ms)
        self._retire(item_id)

    def committed(self, item_id: str, at_ms: int) -> _Item:
        if item_id not in self._items:
            # A commit during speech may name a new item: it holds the open speech.
            open_id = next((k for k, i in self._items.items() if i.speaking), None)
            if open_id is not None:
                self._items[item_id] = self._items.pop(open_id)
        item = self._get(item_id)
        item.committed, item.speaking = True, False
        if item.end_ms is None:
            item.end_ms = at_ms
        return item

    async def delta(self, item_id: str, delta: str, at_ms: int) -> None:
        item = self._get(item_id)
        if item.done:
            return
        item.text += delta
        if item.text.strip():
            index = await self._announce(item, at_ms)
            await self._emit(SpeechEvent(SpeechEventType.PARTIAL, index, text=item.text.strip()))

    async def completed(self, item_id: str, transcript: str | None, at_ms: int) -> None:
        item = self._get(item_id)
        text = transcript.strip() if transcript is not None else ""
        await self._finish(item, text or item.text.strip(), at_ms)
        self._retire(item_id)

    async def failed(self, item_id: str) -> None:
        """The item's transcription failed: close it if nothing of it was shown.

        With a partial shown, the session turns it into the final (and stops the
        utterance) when the stream fails, so nothing is sent here.
        """
        item = self._get(item_id)
        if item.done or item.text.strip():
            return
        item.done = True
        if item.stopped and item.end_ms is not None:
            await self._close(item, item.end_ms)
        self._retire(item_id)

    async def flush(self, end_ms: int | None = None) -> None:
        """End of stream: what was shown becomes final and every item is closed."""
        for item_id, item in list(self._items.items()):
            at = end_ms if end_ms is not None else item.end_ms or item.start_ms or self._last_end
            await self._finish(item, item.text.strip(), at)
            self._items.pop(item_id, None)

    def _get(self, item_id: str) -> _Item:
        if item_id in self._finished:
            return _Item(done=True, closed=True)  # a late event for a finished item: ignored
        return self._items.setdefault(item_id, _Item())

    async def _finish(self, item: _Item, text: str, at_ms: int) -> None:
        if item.done:
            return
        item.done = True
        if not text and item.index is None:
            return  # nothing was said in it: no utterance
        index = await self._announce(item, at_ms)
        start = item.start_ms if item.start_ms is not None else at_ms
        end = max(item.end_ms if item.end_ms is not None else at_ms, start)
        if text:
            await self._emit(SpeechEvent(SpeechEventType.FINAL, index, text, start, end))
        # Its speech_stopped (held until now), or, committed by us or never
        # stopped by the VAD, it ends here.
        await self._close(item, end)
        self._last_end = max(self._last_end, end)

    async def _announce(self, item: _Item, at_ms: int) -> int:
        if item.index is None:
            if item.start_ms is None:  # no speech_started: it began after the previous item
                item.start_ms = min(self._last_end, at_ms)
            item.index = self.index
            self.index += 1
            await self._emit(
                SpeechEvent(SpeechEventType.SPEECH_STARTED, item.index, start_ms=item.start_ms)
            )
        return item.index

    async def _close(self, item: _Item, end_ms: int) -> None:
        if item.index is not None and not item.closed:
            item.closed = True
            await self._emit(SpeechEvent(SpeechEventType.SPEECH_STOPPED, item.index, end_ms=end_ms))

    def _retire(self, item_id: str) -> None:
        item = self._items.get(item_id)
        if item is not None and item.done and (item.closed or item.index is None):
            del self._items[item_id]
            self._finished.add(item_id)


class OpenAIStream(CloudStream):
    # No size is documented for an append: a 20 ms client chunk goes on at once
    # (50 ms frames held each event ~22 ms longer).
    chunk_ms: ClassVar[int] = 20
    keepalive_interval_s: ClassVar[float | None] = None  # no keepalive message exists
    answers_continuously: ClassVar[bool] = False

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self.items = Items(self._emit)
        self.utterances = self.items  # the base flushes it at the end
        self._realtime = options.model == "gpt-realtime"
        self._commit_sent = False
        self._commit_acked = False
        self._loudness = LoudnessWatch(options.sample_rate, options.endpointing_ms)

    def url(self) -> str:
        query = "model=gpt-realtime" if self._realtime else "intent=transcription"
        return f"{_ws_base(self.base_url)}/v1/realtime?{query}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def session_config(self) -> dict[str, Any]:
        options = self.options
        transcription: dict[str, Any] = {
            "model": REALTIME_TRANSCRIBER if self._realtime else options.model
        }
        language = options.language.split("-")[0].lower()
        if language and language != "multi":  # omitted: the model detects the language
            transcription["language"] = language
        if options.prompt:
            transcription["prompt"] = options.prompt
        turn_detection: dict[str, Any] = {
            "type": "server_vad",
            "threshold": options.vad_threshold,
            "prefix_padding_ms": options.vad_prefix_padding_ms,
            "silence_duration_ms": options.endpointing_ms,
        }
        session: dict[str, Any] = {"type": "transcription"}
        if self._realtime:
            # Transcription only: the speech-to-speech model must never reply.
            turn_detection |= {"create_response": False, "interrupt_response": False}
            session = {"type": "realtime", "output_modalities": ["text"]}
        session["audio"] = {
            "input": {
                "format": {"type": "audio/pcm", "rate": RATE},
                "transcription": transcription,
                "turn_detection": turn_detection,
            }
        }
        return session

    async def on_open(self) -> None:
        await self._await_event("session.created")
        await self.send_json({"type": "session.update", "session": self.session_config()})
        await self._await_event("session.updated")

    async def _await_event(self, kind: str) -> None:
        while True:  # bounded by connect()'s timeout
            try:
                event = json.loads(await self.receive())
            except ConnectionClosed as exc:
                raise self._handshake_closed(exc) from exc
            if event.get("type") == "error":
                raise self._error(event)
            if event.get("type") == kind:
                return

    def audio_frame(self, pcm16: bytes) -> Frame:
        if self._loudness.process(pcm16, speaking=self.items.speaking):
            self.expect_answer()  # silent during silence: speech_started/stopped is due
        audio = base64.b64encode(pcm16).decode("ascii")
        return json.dumps({"type": "input_audio_buffer.append", "audio": audio})

    def finalize_frames(self) -> Sequence[Frame]:
        self._commit_sent = True
        return [json.dumps({"type": "input_audio_buffer.commit", "event_id": FINAL_COMMIT})]

    async def on_message(self, message: Frame) -> bool:
        event = json.loads(message)
        kind = event.get("type")
        item_id = str(event.get("item_id", ""))
        now = round(self.sent_ms)
        if kind == "error":
            if self._commit_sent and _is_commit_empty(event):
                self._commit_acked = True  # nothing was left to flush
            elif _about(event, FINAL_COMMIT):
                raise self._error(event)  # the finalize failed: nothing will answer it
            else:
                self._recoverable(event)
        elif kind == "input_audio_buffer.speech_started":
            self.answered()
            self._loudness.reset()
            await self.items.started(item_id, int(event.get("audio_start_ms", now)))
        elif kind == "input_audio_buffer.speech_stopped":
            self.answered()
            await self.items.stopped(item_id, int(event.get("audio_end_ms", now)))
            self.expect_answer()  # its transcript is due
        elif kind == "input_audio_buffer.committed":
            item = self.items.committed(item_id, now)
            if self._commit_sent and not item.stopped:
                self._commit_acked = True  # ours: the server VAD stops before it commits
        elif kind == "conversation.item.input_audio_transcription.delta":
            self.answered()
            await self.items.delta(item_id, str(event.get("delta") or ""), now)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.answered()
            await self.items.completed(item_id, event.get("transcript"), now)
        elif kind == "conversation.item.input_audio_transcription.failed":
            await self.items.failed(item_id)
            raise self._error(event, "transcription failed")
        if self.items.pending:
            self.expect_answer()  # a committed item's transcript is still due
        return self._commit_acked and not self.items.pending

    def _recoverable(self, event: dict[str, Any]) -> None:
        """An ``error`` mid-stream: logged, and the session goes on.

        "Most errors are recoverable and the session will stay open, we
        recommend to implementers to monitor and log error messages by default"
        (https://developers.openai.com/api/reference/resources/realtime/server-events).
        If the server then closes, the close fails the stream and names this error.
        """
        error = event.get("error") or {}
        self.log.warning(
            "provider error, session goes on",
            extra={"code": error.get("code") or error.get("type"), "reason": error.get("message")},
        )
        self.last_error = self._error(event)

    def _error(self, event: dict[str, Any], what: str = "") -> ProviderError:
        error = event.get("error") or {}
        code = error.get("code") or error.get("type") or "error"
        text = f"{code}: {error.get('message') or 'no message'}"
        if code == "invalid_api_key":
            return self.fail(f"authentication refused ({text})", retryable=False)
        return self.fail(f"{what}: {text}" if what else text)

    def _handshake_closed(self, exc: ConnectionClosed) -> ProviderError:
        frame = exc.rcvd
        if frame is None:
            return self.fail("closed during the handshake: no close frame")
        detail = f"code {frame.code}, {frame.reason}"
        if "invalid_api_key" in frame.reason:  # OpenAI's answer to a bad key
            return self.fail(f"authentication refused ({detail})", retryable=False)
        return self.fail(f"closed during the handshake: {detail}")


def _about(event: dict[str, Any], event_id: str) -> bool:
    """Whether an ``error`` answers our client event ``event_id``."""
    error = event.get("error") or {}
    return error.get("event_id") == event_id


def _is_commit_empty(event: dict[str, Any]) -> bool:
    error = event.get("error") or {}
    message = str(error.get("message") or "").lower()
    return error.get("code") == COMMIT_EMPTY or (
        "buffer" in message and ("too small" in message or "empty" in message)
    )


def _ws_base(url: str) -> str:
    """``OPENAI_BASE_URL`` as a WebSocket origin; the SDKs' ``https://…/v1`` form works too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "wss", url
    scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    base = f"{scheme}://{rest}".rstrip("/")
    return base.removesuffix("/v1")


def _model(name: str, description: str) -> ModelInfo:
    return ModelInfo(name, description, input_rate=RATE)


class OpenAISTT(CloudSTT):
    provider: ClassVar[str] = "OPENAI"
    default_base_url: ClassVar[str] = "wss://api.openai.com"
    model_infos: ClassVar[tuple[ModelInfo, ...]] = (
        _model("gpt-4o-transcribe", "GPT-4o Transcribe via a Realtime transcription session"),
        _model(
            "gpt-4o-mini-transcribe", "GPT-4o mini Transcribe via a Realtime transcription session"
        ),
        _model("gpt-realtime", "gpt-realtime session, input transcribed by gpt-4o-transcribe"),
    )
    stream_class: ClassVar[type[CloudStream]] = OpenAIStream
