"""The documented outcomes of the wire layer, and hypothesis strategies of hostile frames.

Shared by the property tests (tests/reliability/test_*_properties.py) and the
coverage-guided fuzz target (fuzz/fuzz_session.py): both check the same
invariants, so a finding in one is a test in the other.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Final

from hypothesis import strategies as st

from transcribe_gateway.protocol import messages as m
from transcribe_gateway.protocol.session import POLICY, UNAUTHORIZED

PARSE_CODES: Final = frozenset({"invalid_message", "invalid_session_config", "invalid_audio"})
"""What :func:`parse_client_message` may raise (its docstring)."""

SESSION_CODES: Final = PARSE_CODES | {
    "audio_too_large",
    "session_not_configured",
    "session_closing",
}
"""``error`` codes the sans-I/O session sends for client input (docs/protocol.md)."""

CLIENT_CLOSE_CODES: Final = frozenset({UNAUTHORIZED, POLICY})
"""Close codes client input alone can cause (4001 before auth, 1008 for abuse)."""

GOOD_KEY: Final = "good-key"
MAX_ERROR_CHARS: Final = 1024
"""Longest ``error`` message a parse failure may produce, whatever the frame's size."""

# ------------------------------------------------------------------ strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)

config_fields: Final[dict[str, st.SearchStrategy[Any]]] = {
    "provider": st.sampled_from(["LOCAL", "DEEPGRAM", "", "local"]) | json_values,
    "model": st.sampled_from(["whisper-tiny.en", "nova-3"]) | json_values,
    "language": st.sampled_from(["en", "multi", "fr-FR"]) | json_values,
    "prompt": st.none() | st.text(max_size=60) | json_values,
    "input_audio_format": st.sampled_from([*m.AUDIO_FORMATS, "opus", ""]) | json_values,
    "sample_rate": st.integers(7990, 48010) | st.sampled_from([8000, 16000, 48000]) | json_values,
    "endpointing": st.integers(0, 20000) | json_values,
    "vad": st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            "threshold": st.floats(-1, 2) | json_values,
            "prefix_padding_ms": st.integers(-10, 3000) | json_values,
            "min_speech_ms": st.integers(-10, 3000) | json_values,
        },
    )
    | json_values,
    "fallback": st.none()
    | st.fixed_dictionaries({"provider": st.just("LOCAL"), "model": st.text(max_size=20)})
    | json_values,
    "colour": json_values,  # unknown fields are an error
}
session_configs = (
    st.fixed_dictionaries({}, optional={k: v for k, v in config_fields.items()}) | json_values
)

base64_edge_cases = st.sampled_from(
    [
        "",
        "=",
        "==",
        "====",
        "AA",
        "AA=",
        "AA==",
        "AAA=",
        "AAAA",
        "AAAA=",
        "AAAA==",
        "AA==AA==",
        "AAAA AAAA",
        "AAAA\nAAAA",
        " AAAA",
        "AA-_",  # urlsafe alphabet
        "AAAA\x00",
        "ÀÀÀÀ",
        "QUJD=",
        "QUI=",
        "QUJ=",
    ]
)
base64_texts = (
    base64_edge_cases
    | st.binary(max_size=700).map(lambda b: base64.b64encode(b).decode())
    | st.binary(max_size=700).map(lambda b: base64.urlsafe_b64encode(b).decode())
    | st.binary(min_size=1, max_size=700).map(lambda b: base64.b64encode(b).decode().rstrip("="))
    | st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n", max_size=80
    )
    | st.text(max_size=40)
)

message_dicts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("auth")},
        optional={"token": st.sampled_from([GOOD_KEY, "bad"]) | json_values, "extra": json_values},
    ),
    st.fixed_dictionaries(
        {"type": st.just("session.update")},
        optional={"session": session_configs, "extra": json_values},
    ),
    st.fixed_dictionaries(
        {"type": st.just("audio.append")},
        optional={"audio": base64_texts | json_values, "extra": json_values},
    ),
    st.fixed_dictionaries({"type": st.just("session.close")}, optional={"extra": json_values}),
    st.fixed_dictionaries({"type": json_values | st.sampled_from(["AUTH", "audio", " auth"])}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


def _nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    if kind == "dict":
        return '{"a":' * depth + "1" + "}" * depth
    return '{"type":"auth","token":' + "[" * depth + "]" * depth + "}"


deep_nesting = st.builds(
    _nested, st.integers(1, 20000), st.sampled_from(["list", "dict", "in-message"])
)


def _huge(size: int, where: str) -> str:
    if where == "token":
        return json.dumps({"type": "auth", "token": "k" * size})
    if where == "audio":
        return json.dumps({"type": "audio.append", "audio": "A" * size})
    if where == "prompt":
        return json.dumps(
            {
                "type": "session.update",
                "session": {"provider": "LOCAL", "model": "x", "prompt": "é" * size},
            }
        )
    return "x" * size


huge_strings = st.builds(
    _huge, st.integers(0, 1_200_000), st.sampled_from(["token", "audio", "prompt", "raw"])
)

frames = st.one_of(
    message_dicts.map(json.dumps),
    message_dicts.map(lambda d: json.dumps(d, ensure_ascii=False)),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    deep_nesting,
)
"""Any text frame a hostile client could send (huge ones are tested on their own)."""


# ------------------------------------------------------------------ invariants


def check_parse(text: str | bytes) -> m.ClientMessage | m.ParseError:
    """Parse ``text``; fail the test unless the outcome is a documented one."""
    try:
        message = m.parse_client_message(text)
    except m.ParseError as exc:
        assert exc.code in PARSE_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        assert exc.field is None or isinstance(exc.field, str)
        # Client input is echoed clipped: an error is never an amplifier of a frame.
        assert len(exc.message) <= MAX_ERROR_CHARS, len(exc.message)
        assert exc.field is None or len(exc.field) <= MAX_ERROR_CHARS // 2
        return exc
    assert isinstance(message, m.Auth | m.SessionUpdate | m.AudioAppend | m.SessionClose)
    # What parses re-encodes to the same message.
    assert m.parse_client_message(m.encode(message)) == message
    return message


def expected_parse_code(doc: Any) -> str:
    """The code a bad, JSON-encoded ``doc`` must get (docs/protocol.md "Error codes")."""
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "session.update":
        return "invalid_session_config"
    if kind == "audio.append":
        return "invalid_audio"
    return "invalid_message"


def check_frames(frames_out: list[str]) -> list[m.ServerMessage]:
    """Every frame the session writes is a well-formed server message with a known code."""
    out = []
    for frame in frames_out:
        message = m.parse_server_message(frame)
        if isinstance(message, m.Error):
            assert message.error.code in SESSION_CODES, message.error.code
            assert message.error.message
        out.append(message)
    return out
