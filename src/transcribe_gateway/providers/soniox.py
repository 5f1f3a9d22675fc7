"""Soniox real-time speech-to-text (model ``stt-rt-v4``) over Soniox's WebSocket API.

Protocol, as documented (checked against an emulator of these docs,
``tests/emulators/soniox.py``, not against the live service):

* ``wss://stt-rt.soniox.com/transcribe-websocket``; the key travels with the
  connection as ``Authorization: Bearer <key>`` (``api_key`` in the start
  request is deprecated) -
  https://soniox.com/docs/api-reference/stt/websocket-api.mdx,
  https://soniox.com/docs/guides/websocket-authentication,
  https://soniox.com/docs/guides/migrate-websocket-authentication
* the first message is the start request (``model``, ``audio_format``
  ``pcm_s16le`` with ``sample_rate`` / ``num_channels``, ``language_hints``,
  ``context``, ``enable_endpoint_detection``, ``max_endpoint_delay_ms``
  500..3000), then audio as binary frames -
  https://soniox.com/docs/stt/api-reference/websocket-api,
  https://soniox.com/docs/stt/rt/real-time-transcription (audio formats)
* ``{"type": "keepalive"}`` at least every 20 s without audio -
  https://soniox.com/docs/speech-to-text/core-concepts/connection-keepalive
* an empty frame ends the audio: the server finalizes everything, answers
  ``finished: true`` and closes (the official example sends ``""``) -
  https://github.com/soniox/soniox_examples/blob/master/speech_to_text/python/soniox_realtime.py
* responses carry ``tokens`` (``text``, ``start_ms``, ``end_ms``,
  ``confidence``, ``is_final``; sub-word pieces whose own leading space starts
  a word), final tokens are sent once, non-final ones are replaced by each
  response; ``<end>`` ends an utterance (endpoint detection), ``<fin>`` ends a
  manual finalization -
  https://soniox.com/docs/stt/core-concepts/real-time-transcription,
  https://soniox.com/docs/stt/rt/endpoint-detection,
  https://soniox.com/docs/stt/real-time-API/manual-finalization
* errors are a response with ``error_code`` / ``error_message``, then the
  server closes - https://soniox.com/docs/stt/rt/error-handling

Soniox has no VAD settings (its endpointing is semantic), so ``vad`` is
reported unsupported; ``speech.started`` comes with the first token of an
utterance and ``speech.stopped`` with its ``<end>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from transcribe_gateway.exceptions import ProviderError
from transcribe_gateway.providers.base import ModelInfo, StreamOptions, WordTiming
from transcribe_gateway.providers.cloud import CloudStream, CloudSTT, Frame

MARKERS = frozenset({"<end>", "<fin>"})
"""Tokens that end an utterance: endpoint detected, manual finalization done."""
ENDPOINT_DELAY_RANGE = (500, 3000)
"""``max_endpoint_delay_ms`` bounds (Soniox WebSocket API reference)."""


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    start_ms: int
    end_ms: int
    confidence: float | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Token:
        start = int(raw.get("start_ms") or 0)
        confidence = raw.get("confidence")
        return cls(
            str(raw.get("text", "")),
            start,
            int(raw.get("end_ms") or start),
            float(confidence) if confidence is not None else None,
        )


def words_of(tokens: Sequence[Token]) -> tuple[WordTiming, ...]:
    """Join sub-word tokens into words: a token with a leading space starts one."""
    groups: list[list[Token]] = []
    for token in tokens:
        if not token.text.strip():
            if groups:
                groups.append([])  # a bare space token: the next piece starts a word
            continue
        if not groups or not groups[-1] or token.text[0].isspace():
            groups.append([token])
        else:
            groups[-1].append(token)
    words = []
    for group in (g for g in groups if g):
        scores = [t.confidence for t in group if t.confidence is not None]
        words.append(
            WordTiming(
                "".join(t.text for t in group).strip(),
                group[0].start_ms,
                group[-1].end_ms,
                round(sum(scores) / len(scores), 4) if scores else None,
            )
        )
    return tuple(words)


class SonioxStream(CloudStream):
    chunk_ms: ClassVar[int] = 100
    keepalive_interval_s: ClassVar[float | None] = 5.0  # docs: at least every 20 s
    answers_continuously: ClassVar[bool] = True

    def __init__(self, stt: CloudSTT, options: StreamOptions) -> None:
        super().__init__(stt, options)
        self._final: list[Token] = []
        """Final tokens of the utterance in progress (Soniox sends each once)."""
        self._last_partial = ""

    def url(self) -> str:
        return f"{self.base_url}/transcribe-websocket"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start_request(self) -> dict[str, Any]:
        """The first message: the session's configuration (no key: it is in the header)."""
        options = self.options
        low, high = ENDPOINT_DELAY_RANGE
        request: dict[str, Any] = {
            "model": options.model,
            "audio_format": "pcm_s16le",
            "sample_rate": options.sample_rate,
            "num_channels": 1,
            "enable_endpoint_detection": True,
            "max_endpoint_delay_ms": min(max(options.endpointing_ms, low), high),
        }
        language = options.language.split("-")[0].lower()
        if language and language != "multi":  # no hints: Soniox detects the language
            request["language_hints"] = [language]
        if options.prompt:
            request["context"] = {"text": options.prompt}
        return request

    async def on_open(self) -> None:
        await self.send_json(self.start_request())

    def audio_frame(self, pcm16: bytes) -> Frame:
        return pcm16

    def keepalive_frame(self) -> Frame | None:
        return json.dumps({"type": "keepalive"})

    def finalize_frames(self) -> Sequence[Frame]:
        return [""]  # an empty frame: end of audio, finalize and finish

    async def on_message(self, message: Frame) -> bool:
        response = json.loads(message)
        if response.get("error_code") is not None:
            raise self._error(response)
        nonfinal: list[Token] = []
        for raw in response.get("tokens") or ():
            token = Token.parse(raw)
            if token.text in MARKERS:
                await self._end_utterance()
                nonfinal.clear()
            elif raw.get("is_final"):
                self._final.append(token)
            else:
                nonfinal.append(token)
        if response.get("finished"):
            await self._end_utterance()
            return True
        await self._show(self._final + nonfinal)
        return False

    async def _show(self, tokens: list[Token]) -> None:
        text = "".join(t.text for t in tokens).strip()
        if text and text != self._last_partial:
            self._last_partial = text
            await self.utterances.interim(text, start_ms=tokens[0].start_ms)

    async def _end_utterance(self) -> None:
        tokens, self._final = self._final, []
        self._last_partial = ""
        text = "".join(t.text for t in tokens).strip()
        if text:
            end = tokens[-1].end_ms
            await self.utterances.commit(text, tokens[0].start_ms, end, words_of(tokens))
            await self.utterances.complete(end)
            await self.utterances.speech_stopped(end)
        elif self.utterances.open:
            await self.utterances.flush()

    def _error(self, response: dict[str, Any]) -> ProviderError:
        code = response.get("error_code")
        detail = f"error {code}: {response.get('error_message', '')}".strip()
        return self.fail_status(detail, code)


class SonioxSTT(CloudSTT):
    provider: ClassVar[str] = "SONIOX"
    default_base_url: ClassVar[str] = "wss://stt-rt.soniox.com"
    model_infos: ClassVar[tuple[ModelInfo, ...]] = (
        ModelInfo(
            "stt-rt-v4",
            "Soniox real-time v4 (60+ languages, semantic endpoint detection)",
            input_rate=16000,
            supports_vad=False,
        ),
    )
    stream_class: ClassVar[type[CloudStream]] = SonioxStream
