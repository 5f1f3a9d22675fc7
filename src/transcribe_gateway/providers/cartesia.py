"""Cartesia Ink speech-to-text (model ``ink-whisper``) over Cartesia's STT WebSocket.

Protocol, as documented for API version ``2025-04-16`` (checked against an
emulator of these docs, ``tests/emulators/cartesia.py``, not against the live
service):

* ``wss://api.cartesia.ai/stt/websocket`` with the query ``model``,
  ``language`` (ISO-639-1, default ``en``), ``encoding=pcm_s16le``,
  ``sample_rate`` (16000) and ``max_silence_duration_secs`` (silence that makes
  the service finalize an utterance); the key in ``X-API-Key`` (or the
  ``api_key`` query parameter) and the version in ``Cartesia-Version`` -
  https://docs.cartesia.ai/2025-04-16/api-reference/stt/stt,
  https://docs.cartesia.ai/2024-06-10/api-reference/stt/stt
* audio as binary frames "in small chunks (e.g. 100ms)"; text commands
  ``finalize`` (flush what is buffered, answered by ``flush_done``) and
  ``done`` (flush, answered by ``done``, then the service closes); the
  connection closes after 20 s without a message, audio or command -
  https://docs.cartesia.ai/2025-04-16/api-reference/stt/stt
* ``transcript`` messages (``is_final``, ``text``, ``duration``, ``words``
  with ``start``/``end`` in seconds); ``text`` is a delta since the last
  final chunk, spacing included (a chunk may start inside a word, the next
  word's leading space is in the chunk), and ``duration`` the length of the
  audio that produced it -
  https://docs.cartesia.ai/api-reference/stt/stt,
  https://docs.cartesia.ai/use-the-api/stt/common-pitfalls,
  https://github.com/cartesia-ai/cartesia-js/blob/main/src/resources/stt/manual-finalize/manual-finalize.ts
* errors are ``{"type": "error", ...}`` with ``error`` or ``message`` and a
  ``code`` / ``status_code``; too many connections is an HTTP 429 -
  https://docs.cartesia.ai/2024-11-13/api-reference/stt/websocket,
  https://docs.cartesia.ai/api-reference/stt/turns/websocket

Cartesia sends no speech events and nothing while it hears silence, so the
stream runs the gateway's own Silero VAD on the audio it sends (the session's
``vad`` and ``endpointing`` settings): ``speech.started`` / ``speech.stopped``
come from it, and at each end of speech the stream sends ``finalize``, as the
docs advise for clients with their own VAD.  The ``flush_done`` that must
follow bounds the wait for the provider (a fallback can take over if it never
comes) and marks the end of the utterance.  Word times are taken as relative
to the chunk that produced them: each final chunk starts where the previous
one's ``duration`` ended.  An utterance's text is its chunks' ``text``
concatenated as sent, stripped only at its ends.  ``min_volume`` is left at
Cartesia's default (a volume, not our speech probability); ``prompt`` is
reported unsupported (no keyterms for ``ink-whisper`` in this API version).
An idle connection is kept open with ``finalize``, which the docs count as
activity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import ModelInfo, StreamOptions, WordTiming
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame, Utterances
from transcribe_gateway.providers.cloud_vad import LocalEndpointingStream

API_VERSION = "2025-04-16"
RATE = 16000
"""The only rate API version 2025-04-16 takes (and the one it recommends)."""
# fmt: off
LANGUAGES = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv",
    "it", "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no",
    "th", "ur", "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr",
    "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw",
    "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu",
    "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl",
    "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su", "yue",
)
# fmt: on
"""``ink-whisper`` languages (https://docs.cartesia.ai/api-reference/stt/stt)."""


class CartesiaStream(LocalEndpointingStream):
    chunk_ms: ClassVar[int] = 100  # docs: "small chunks (e.g. 100ms)"
    keepalive_interval_s: ClassVar[float | None] = 5.0  # docs: closed after 20 s idle

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        # Each ``text`` is a delta, spacing included: "Do not strip whitespace from
        # `text` or add whitespace between chunks" (cartesia-js
        # src/resources/stt/manual-finalize/manual-finalize.ts); "Joining with a
        # space inserts spaces in the middle of words"
        # (https://docs.cartesia.ai/use-the-api/stt/common-pitfalls).
        self.utterances = Utterances(self._emit, verbatim=True)
        self._done_sent = False
        self._chunk_start_ms = 0.0
        """Audio the service has finalized so far: where the next delta's times start."""

    def url(self) -> str:
        options = self.options
        query = {
            "model": options.model,
            "language": options.language.split("-")[0].lower(),
            "encoding": "pcm_s16le",
            "sample_rate": str(options.sample_rate),
            "max_silence_duration_secs": f"{options.endpointing_ms / 1000:g}",
        }
        return f"{self.base_url}/stt/websocket?{urlencode(query)}"

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key, "Cartesia-Version": API_VERSION}

    def audio_frame(self, pcm16: bytes) -> Frame:
        return pcm16

    def keepalive_frame(self) -> Frame | None:
        # Any message resets the idle timer; finalize is the one with an answer.
        self.expect_flush()
        return self.flush_frame()

    def flush_frame(self) -> Frame:
        return "finalize"

    def finalize_frames(self) -> Sequence[Frame]:
        self._done_sent = True
        return ["done"]

    async def on_message(self, message: Frame) -> bool:
        response: dict[str, Any] = json.loads(message)
        kind = response.get("type")
        async with self._lock:
            if kind == "transcript":
                self.answered()
                await self._transcript(response)
                if self._flushes and not self._done_sent:
                    self.expect_answer()  # the flush_done is still due
            elif kind == "flush_done":
                self.answered()
                self.flush_answered()
                await self.close_utterance()
            elif kind == "done":
                return True
            elif kind == "error":
                raise self._error(response)
        return False

    async def _transcript(self, response: dict[str, Any]) -> None:
        base = self._chunk_start_ms
        duration_ms = float(response.get("duration") or 0.0) * 1000
        words = tuple(
            WordTiming(
                str(w["word"]).strip(),
                round(base + float(w.get("start", 0.0)) * 1000),
                round(base + float(w.get("end", 0.0)) * 1000),
            )
            for w in response.get("words") or ()
            if str(w.get("word", "")).strip()
        )
        text = str(response.get("text") or "")
        start = words[0].start_ms if words else round(base)
        if not response.get("is_final"):
            await self.utterances.interim(text, start)
            return
        end = words[-1].end_ms if words else round(base + duration_ms)
        self._chunk_start_ms += duration_ms or max(0.0, end - base)
        await self.utterances.commit(text, start, end, words)
        if not (self._speaking or self._flushes or self._held):
            # The service's own endpointing closed speech our VAD did not hear.
            await self.utterances.flush(end)

    def _error(self, response: dict[str, Any]) -> ProviderError:
        code = response.get("code", response.get("status_code"))
        text = response.get("error") or response.get("message") or response.get("title")
        detail = f"error {code}: {text}" if code is not None else f"error: {text}"
        return self.fail_status(detail, code)


class CartesiaSTT(CloudSTT):
    provider: ClassVar[str] = "CARTESIA"
    default_base_url: ClassVar[str] = "wss://api.cartesia.ai"
    model_infos: ClassVar[tuple[ModelInfo, ...]] = (
        ModelInfo(
            "ink-whisper",
            "Cartesia Ink Whisper (streaming Whisper, 100 languages)",
            languages=LANGUAGES,
            input_rate=RATE,
            supports_prompt=False,
        ),
    )
    stream_class: ClassVar[type[CloudStream]] = CartesiaStream
