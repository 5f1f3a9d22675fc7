"""ElevenLabs Scribe v2 Realtime (model ``scribe-v2-realtime``) over its WebSocket API.

Protocol, as documented (checked against an emulator of these docs,
``tests/emulators/elevenlabs.py``, not against the live service):

* ``wss://api.elevenlabs.io/v1/speech-to-text/realtime`` with the query
  ``model_id=scribe_v2_realtime``, ``audio_format`` (``pcm_16000``...),
  ``language_code`` (ISO 639-1/3; none: detected), ``commit_strategy``
  (``manual`` default, or ``vad`` with ``vad_silence_threshold_secs``,
  ``vad_threshold``, ``min_speech_duration_ms``, ``min_silence_duration_ms``),
  ``include_timestamps``; the key in the ``xi-api-key`` header -
  https://elevenlabs.io/docs/api-reference/speech-to-text/v-1-speech-to-text-realtime,
  https://github.com/elevenlabs/elevenlabs-python/blob/main/src/elevenlabs/realtime/scribe.py
* the service first sends ``session_started``; audio goes as JSON
  ``{"message_type": "input_audio_chunk", "audio_base_64", "commit",
  "sample_rate"}``, ``previous_text`` (context) only with the first chunk; a
  chunk with ``commit: true`` commits the segment, answered by a
  ``committed_transcript`` -
  https://github.com/elevenlabs/elevenlabs-python/blob/main/src/elevenlabs/realtime/connection.py,
  https://cdn.jsdelivr.net/npm/@elevenlabs/elevenlabs-js@2.39.0/api/types/InputAudioChunkPayload.d.ts
* answers: ``partial_transcript`` (``text`` of the uncommitted audio),
  ``committed_transcript`` (``text``), then with timestamps on
  ``committed_transcript_with_timestamps`` (``words``: ``text``, ``start``,
  ``end`` in seconds, ``type`` word/spacing/punctuation, ``logprob``) -
  https://elevenlabs.io/docs/eleven-api/guides/how-to/speech-to-text/realtime/event-reference,
  https://elevenlabs.io/docs/cookbooks/speech-to-text/streaming
* errors are messages whose ``message_type`` names them (``auth_error``,
  ``quota_exceeded``, ``rate_limited``, ``input_error``, ...) with an
  ``error`` text, sent before the service closes - same pages.

The stream commits manually, at the end of each utterance heard by the
gateway's own Silero VAD (the session's ``vad`` and ``endpointing`` settings),
because ElevenLabs sends no speech events and one ``committed_transcript`` per
commit makes every answer accountable: the commit bounds the wait for the
provider (a fallback can take over if no answer comes) and, at the end of the
input, the last commit's answer is known to be the last message.
``speech.started`` / ``speech.stopped`` come from that VAD.  ``prompt`` goes
as ``previous_text`` (its last 50 characters).  ElevenLabs documents no
keepalive message, so a pause without audio is bridged with 100 ms of silence
every 5 s; the provider's times are mapped back to the stream's clock.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import ModelInfo, StreamOptions, WordTiming
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame
from transcribe_gateway.providers.cloud_vad import LocalEndpointingStream

MODEL_IDS = {"scribe-v2-realtime": "scribe_v2_realtime"}
"""Our model name (the issue's spelling) to ElevenLabs' ``model_id``."""
RATE = 16000
PREVIOUS_TEXT_CHARS = 50
KEEPALIVE_MS = 100
REFUSED = frozenset({"auth_error"})
ERRORS = frozenset(
    {
        "error",
        "auth_error",
        "quota_exceeded",
        "commit_throttled",
        "transcriber_error",
        "unaccepted_terms",
        "rate_limited",
        "input_error",
        "invalid_request",
        "queue_overflow",
        "resource_exhausted",
        "session_time_limit_exceeded",
        "chunk_size_exceeded",
        "insufficient_audio_activity",
    }
)
"""Error messages (the ``RealtimeEvents`` of ElevenLabs' Python SDK)."""
FINAL_ERRORS = frozenset({"auth_error", "quota_exceeded", "unaccepted_terms"})
"""Errors a retry (or a fallback to the same account) will not cure."""


class ElevenLabsStream(LocalEndpointingStream):
    chunk_ms: ClassVar[int] = 100
    keepalive_interval_s: ClassVar[float | None] = 5.0

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._words_due: str | None = None
        """Committed text whose timestamps message is still to come."""
        self._final_sent = False
        """The last commit (end of input) went out: its answer ends the stream."""
        self._context = _previous_text(options.prompt)
        self._provider_ms = 0.0
        """Audio sent to the provider, keepalive silence included."""
        self._gaps: list[tuple[float, float]] = []
        """(provider ms, length) of each keepalive silence, to map times back."""

    def url(self) -> str:
        options = self.options
        query = {
            "model_id": MODEL_IDS.get(options.model, options.model),
            "audio_format": f"pcm_{options.sample_rate}",
            "commit_strategy": "manual",
            "include_timestamps": "true",
        }
        language = options.language.split("-")[0].lower()
        if language and language != "multi":  # none: ElevenLabs detects it
            query["language_code"] = language
        return f"{self.base_url}/v1/speech-to-text/realtime?{urlencode(query)}"

    def headers(self) -> dict[str, str]:
        return {"xi-api-key": self.api_key}

    async def on_open(self) -> None:
        # The session starts with session_started; an error (a bad key) comes instead.
        reply: dict[str, Any] = json.loads(await self.receive())
        if reply.get("message_type") != "session_started":
            raise self._error(reply)

    def audio_frame(self, pcm16: bytes) -> Frame:
        self._provider_ms += self.pcm16_ms(len(pcm16))
        return self._chunk(pcm16)

    def keepalive_frame(self) -> Frame | None:
        silence = bytes(self.options.sample_rate * KEEPALIVE_MS // 1000 * 2)
        self._gaps.append((self._provider_ms, float(KEEPALIVE_MS)))
        self._provider_ms += KEEPALIVE_MS
        return self._chunk(silence)

    def finalize_frames(self) -> Sequence[Frame]:
        self._flushes += 1  # its answer is bound by the finalize timeout
        self._final_sent = True
        return [self.flush_frame()]

    def flush_frame(self) -> Frame:
        return self._chunk(b"", commit=True)  # answered by a committed_transcript

    def _chunk(self, pcm16: bytes, *, commit: bool = False) -> str:
        message: dict[str, Any] = {
            "message_type": "input_audio_chunk",
            "audio_base_64": base64.b64encode(pcm16).decode("ascii"),
            "commit": commit,
            "sample_rate": self.options.sample_rate,
        }
        if self._context is not None and pcm16:
            message["previous_text"] = self._context  # the first chunk only
            self._context = None
        return json.dumps(message)

    async def on_message(self, message: Frame) -> bool:
        response: dict[str, Any] = json.loads(message)
        kind = response.get("message_type")
        async with self._lock:
            if kind == "partial_transcript":
                await self._settle_words()
                await self.utterances.interim(str(response.get("text") or ""))
            elif kind == "committed_transcript":
                await self._settle_words()
                text = str(response.get("text") or "")
                if text.strip():
                    self._words_due = text  # the timestamps message follows
                else:
                    await self._committed(text, ())
            elif kind == "committed_transcript_with_timestamps":
                if self._words_due is not None:  # else: the empty commit, already done
                    text = str(response.get("text") or self._words_due)
                    self._words_due = None
                    await self._committed(text, self._words(response.get("words") or ()))
            elif kind in ERRORS or "error" in response:
                raise self._error(response)
            self.answered()
            if self._flushes or self._words_due is not None:
                if not self._final_sent:  # still owed; after the last commit the finalize
                    self.expect_answer()  # timeout rules
                return False
            return self._final_sent  # the last commit's answer is the last message

    async def _settle_words(self) -> None:
        """A committed text whose timestamps never came: keep it without words."""
        if self._words_due is not None:
            text, self._words_due = self._words_due, None
            await self._committed(text, ())

    async def _committed(self, text: str, words: tuple[WordTiming, ...]) -> None:
        # The commit is answered only now, with the utterance closed: until then
        # VAD boundaries stay held back, or the next speech start would close the
        # utterance with its partial and this text would land in the next one.
        self.flush_answered()
        if words:
            await self.utterances.commit(text, words[0].start_ms, words[-1].end_ms, words)
        else:
            end = self.utterances.last_end_ms
            await self.utterances.commit(text, end, end)
        await self.close_utterance()

    def _words(self, raw: Sequence[dict[str, Any]]) -> tuple[WordTiming, ...]:
        words = []
        for item in raw:
            if item.get("type", "word") != "word" or not str(item.get("text", "")).strip():
                continue  # spacing and punctuation pieces
            logprob = item.get("logprob")
            words.append(
                WordTiming(
                    str(item["text"]).strip(),
                    self._stream_ms(float(item.get("start", 0.0)) * 1000),
                    self._stream_ms(float(item.get("end", 0.0)) * 1000),
                    round(math.exp(float(logprob)), 4) if logprob is not None else None,
                )
            )
        return tuple(words)

    def _stream_ms(self, provider_ms: float) -> int:
        """A provider time on the stream's clock: keepalive silence taken out."""
        at = bisect.bisect_right(self._gaps, (provider_ms, math.inf))
        shift = 0.0
        for position, length in self._gaps[:at]:
            shift += min(length, provider_ms - position)
        return round(provider_ms - shift)

    def _error(self, response: dict[str, Any]) -> ProviderError:
        kind = str(response.get("message_type") or "unexpected message")
        detail = f"{kind}: {response.get('error') or response.get('message') or response}"
        if kind in REFUSED:
            return self.fail(f"authentication refused ({detail})", retryable=False)
        return self.fail(detail, retryable=kind not in FINAL_ERRORS)


def _previous_text(prompt: str | None) -> str | None:
    """The prompt's tail as ``previous_text`` (whole words, at most 50 characters)."""
    if not prompt or not prompt.strip():
        return None
    text = " ".join(prompt.split())
    if len(text) <= PREVIOUS_TEXT_CHARS:
        return text
    tail = text[-PREVIOUS_TEXT_CHARS:]
    return tail.split(" ", 1)[1] if " " in tail else tail


class ElevenLabsSTT(CloudSTT):
    provider: ClassVar[str] = "ELEVENLABS"
    default_base_url: ClassVar[str] = "wss://api.elevenlabs.io"
    model_infos: ClassVar[tuple[ModelInfo, ...]] = (
        ModelInfo(
            "scribe-v2-realtime",
            "ElevenLabs Scribe v2 Realtime (90+ languages, ~150 ms partials)",
            input_rate=RATE,
        ),
    )
    stream_class: ClassVar[type[CloudStream]] = ElevenLabsStream
