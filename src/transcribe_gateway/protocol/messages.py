"""Wire messages of the Transcribe protocol: typed structs, parse and serialize.

Client messages are decoded straight into a tagged union with msgspec, which
validates types, ranges and unknown fields in one pass (the hot path is one
``audio.append`` every 20 ms per session, so a fast decoder matters).  When
that fails, :func:`parse_client_message` re-reads the frame slowly to pick the
error code and name the bad field.  Server messages are structs encoded by
:func:`encode`.  Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Final, Literal

import msgspec
import msgspec.inspect

AUDIO_FORMATS: Final = ("pcm16", "mulaw", "alaw")
MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000

AudioFormat = Literal["pcm16", "mulaw", "alaw"]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of client structs: unknown fields are an error (PROTOCOL.md)."""


# ---------------------------------------------------------------- client side


class VadConfig(_Strict, frozen=True, omit_defaults=True):
    """Optional voice-activity tuning (names follow OpenAI's ``server_vad``)."""

    threshold: Annotated[float, msgspec.Meta(ge=0.05, le=0.95)] | None = None
    """Speech probability above which a frame is speech (default 0.5)."""
    prefix_padding_ms: Annotated[int, msgspec.Meta(ge=0, le=2000)] | None = None
    """Audio kept before the detected start of speech (default 300)."""
    min_speech_ms: Annotated[int, msgspec.Meta(ge=0, le=2000)] | None = None
    """Shortest voiced stretch that counts as speech (default 100)."""


class FallbackConfig(_Strict, frozen=True):
    """Another engine to switch to if the first one fails."""

    provider: str
    model: str


class SessionConfig(_Strict, frozen=True):
    """The ``session`` object of ``session.update``."""

    provider: str
    model: str
    language: str = "en"
    prompt: str | None = None
    input_audio_format: AudioFormat = "pcm16"
    sample_rate: Annotated[int, msgspec.Meta(ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)] = 16000
    endpointing: Annotated[int, msgspec.Meta(ge=10, le=10000)] | None = None
    """Milliseconds of silence that end an utterance."""
    vad: VadConfig | None = None
    fallback: FallbackConfig | None = None
    # Last, so positional construction keeps working (fields only ever get appended).
    endpointing_unfinished: Annotated[int, msgspec.Meta(ge=10, le=10000)] | None = None
    """Milliseconds of silence that end an utterance whose text does not yet end a
    sentence (semantic endpointing; engines that can judge it)."""


class Auth(_Strict, frozen=True, tag="auth", tag_field="type"):
    token: str


class SessionUpdate(_Strict, frozen=True, tag="session.update", tag_field="type"):
    session: SessionConfig


class AudioAppend(_Strict, frozen=True, tag="audio.append", tag_field="type"):
    audio: bytes
    """base64 on the wire (RFC 4648, padded, no whitespace): msgspec decodes and
    checks it while parsing, in C, which halves the cost of a chunk's parse."""


class SessionClose(_Strict, frozen=True, tag="session.close", tag_field="type"):
    pass


ClientMessage = Auth | SessionUpdate | AudioAppend | SessionClose
CLIENT_TYPES: Final = ("auth", "session.update", "audio.append", "session.close")


class ParseError(Exception):
    """A client frame that cannot be used; becomes an ``error`` event.

    Args:
        code: the protocol error code.
        message: human-readable reason.
        field: dotted path of the offending field, when there is one.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


_decoder: Final[msgspec.json.Decoder[ClientMessage]] = msgspec.json.Decoder(ClientMessage)
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_TOO_DEEP: Final = "frame is nested too deeply"


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Decode one client frame.

    Raises:
        ParseError: with ``invalid_message`` (not JSON, no/unknown ``type``),
            ``invalid_session_config`` (bad ``session.update``, naming the
            field) or ``invalid_audio`` (bad ``audio.append``).
    """
    try:
        return _decoder.decode(text)
    except msgspec.ValidationError as exc:
        try:
            relaxed = _relaxed_update(text)
            if relaxed is None:
                diagnosed = _diagnose(text, str(exc))
            else:
                try:
                    return _decoder.decode(relaxed)
                except msgspec.ValidationError as still:
                    diagnosed = _diagnose(relaxed, str(still))
        except RecursionError:
            diagnosed = ParseError("invalid_message", _TOO_DEEP)
        raise diagnosed from None
    except (msgspec.DecodeError, UnicodeEncodeError):  # a str with lone surrogates
        raise ParseError("invalid_message", "frame is not valid JSON") from None
    except RecursionError:
        # msgspec recurses per nesting level: a few KB of "[[[[" would otherwise
        # escape as an internal error (found by tests/reliability fuzzing).
        raise ParseError("invalid_message", _TOO_DEEP) from None


def _relaxed_update(text: str | bytes) -> bytes | None:
    """A ``session.update`` that generic clients write, as we read it; ``None`` if
    nothing needed changing (or it is not one).

    Serializers of config objects (pydantic's ``model_dump``, ``dataclasses.asdict``)
    write ``null`` for an option not set, and Python's ``json`` writes a rate
    computed as a float as ``16000.0`` (an integer to JSON Schema).  So ``null``
    for an option with a default means the default, and an integral float is an
    integer.  Only ``session.update`` takes this slow path: a chunk never does.
    """
    try:
        raw: Any = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    if not isinstance(raw, dict) or raw.get("type") != "session.update":
        return None
    session = raw.get("session")
    if not isinstance(session, dict) or not _relax(session, SessionConfig):
        return None
    return msgspec.json.encode(raw)


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> tuple[msgspec.inspect.Field, ...]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return info.fields


def _relax(obj: dict[str, Any], struct: type[msgspec.Struct]) -> bool:
    """Drop ``obj``'s nulls for fields of ``struct`` with defaults, make its integral
    floats ints where ``struct`` wants an int; whether anything changed."""
    changed = False
    for field in _fields(struct):
        value = obj.get(field.name)
        kinds = (
            field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        )
        if value is None and field.name in obj and not field.required:
            del obj[field.name]
            changed = True
        elif isinstance(value, float) and value.is_integer():
            if any(isinstance(k, msgspec.inspect.IntType) for k in kinds) and not any(
                isinstance(k, msgspec.inspect.FloatType) for k in kinds
            ):
                obj[field.name] = int(value)
                changed = True
        elif isinstance(value, dict):
            for kind in kinds:
                if isinstance(kind, msgspec.inspect.StructType):
                    changed |= _relax(value, kind.cls)
    return changed


_MAX_ECHO: Final = 200
"""Longest piece of client input echoed back in an error."""


def clip_echo(text: str, limit: int = _MAX_ECHO) -> str:
    """``text`` cut to ``limit`` characters: client input echoed in an error is bounded."""
    return text if len(text) <= limit else text[:limit] + "..."


def _diagnose(text: str | bytes, detail: str) -> ParseError:
    """Slow path: work out which message was meant and what is wrong with it."""
    try:
        raw: Any = msgspec.json.decode(text)
    except msgspec.DecodeError:  # pragma: no cover - the fast path caught it
        return ParseError("invalid_message", "frame is not valid JSON")
    if not isinstance(raw, dict):
        return ParseError("invalid_message", "a message must be a JSON object with a 'type'")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        what = "no 'type'" if kind is None else f"unknown message type {repr(kind)[:60]}"
        return ParseError(
            "invalid_message", f"{what}; expected one of {', '.join(CLIENT_TYPES)}", "type"
        )
    match = _PATH.search(detail)
    field = match.group("path") if match else None
    reason = _PATH.sub("", detail)
    named = _FIELD.search(reason)
    if named:  # unknown or missing field: point at the field itself, not its parent
        field = f"{field}.{named.group(1)}" if field else named.group(1)
    # A client's field names are echoed: clipped, so a huge name is not an amplifier.
    field = clip_echo(field) if field is not None else None
    reason = clip_echo(reason, 2 * _MAX_ECHO)
    if kind == "session.update":
        where = f" at {field}" if field else ""
        return ParseError(
            "invalid_session_config", f"invalid session.update{where}: {reason}", field
        )
    if kind == "audio.append":
        if field == "audio" and reason.startswith("Invalid base64"):
            return ParseError("invalid_audio", "audio is not valid base64; chunk dropped", field)
        if field == "audio" and reason.startswith("Expected"):  # a number, null, an object
            message = "audio must be a base64 string; chunk dropped"
            return ParseError("invalid_audio", message, field)
        return ParseError("invalid_audio", f"invalid audio.append: {reason}", field)
    return ParseError("invalid_message", f"invalid {kind}: {reason}", field)


# ---------------------------------------------------------------- server side


class _Out(msgspec.Struct, tag_field="type", omit_defaults=True):
    """Base of server messages."""


class SessionInfo(msgspec.Struct):
    id: str


class EffectiveConfig(msgspec.Struct, omit_defaults=True):
    """What really serves the session, defaults filled in."""

    provider: str
    model: str
    language: str
    input_audio_format: str
    sample_rate: int
    endpointing: int | None = None
    """Absent for an engine that ends utterances its own way (Deepgram Flux)."""
    prompt: str | None = None
    vad: VadConfig | None = None
    fallback: FallbackConfig | None = None
    requested_provider: str | None = None
    """Set when another engine than the one asked for serves the session."""
    requested_model: str | None = None
    notice: str | None = None
    """Plain-words explanation of any substitution."""
    unsupported: list[str] = msgspec.field(default_factory=list)
    """Options the serving engine cannot honour (reported, never silently dropped)."""
    endpointing_unfinished: int | None = None


class Word(msgspec.Struct, omit_defaults=True):
    word: str
    start_ms: int
    end_ms: int
    confidence: float | None = None


class Usage(msgspec.Struct):
    audio_seconds: float


class ErrorInfo(msgspec.Struct):
    code: str
    message: str
    field: str | msgspec.UnsetType = msgspec.UNSET
    """Left out of the frame when no field is to blame."""
    retryable: bool = False
    """Always in the frame, so that ``error.retryable`` can be read as it is."""


class SessionCreated(_Out, tag="session.created"):
    session: SessionInfo


class SessionUpdated(_Out, tag="session.updated"):
    session: EffectiveConfig


class SpeechStarted(_Out, tag="speech.started"):
    utterance_id: str
    audio_start_ms: int


class SpeechStopped(_Out, tag="speech.stopped"):
    utterance_id: str
    audio_end_ms: int


class TranscriptionPartial(_Out, tag="transcription.partial"):
    utterance_id: str
    text: str


class TranscriptionCompleted(_Out, tag="transcription.completed", omit_defaults=False):
    """``words`` is always in the frame (``[]`` when the engine gives none), so a
    client can iterate it without a check."""

    utterance_id: str
    text: str
    start_ms: int
    end_ms: int
    words: list[Word] = msgspec.field(default_factory=list)


class Error(_Out, tag="error"):
    error: ErrorInfo


class SessionClosed(_Out, tag="session.closed"):
    session: SessionInfo
    usage: Usage
    reason: str


ServerMessage = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | TranscriptionPartial
    | TranscriptionCompleted
    | Error
    | SessionClosed
)

_encoder: Final = msgspec.json.Encoder()
_server_decoder: Final[msgspec.json.Decoder[ServerMessage]] = msgspec.json.Decoder(ServerMessage)


def encode(message: ServerMessage | ClientMessage) -> str:
    """Serialize a message to the text of one frame."""
    return _encoder.encode(message).decode()


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Decode one server frame (used by the client SDK)."""
    return _server_decoder.decode(text)
