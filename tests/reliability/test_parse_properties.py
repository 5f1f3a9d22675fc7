"""Property tests of ``parse_client_message``: any frame gets a message or a documented error.

Bounded example counts and no deadline keep them a few seconds in CI; the
open-ended search is the atheris target in fuzz/fuzz_session.py.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reliability import wire
from transcribe_gateway.protocol import messages as m

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestParseNeverRaisesUndocumented:
    @FAST
    @given(wire.frames)
    def test_parser_any_frame_gets_a_documented_outcome(self, text: str) -> None:
        wire.check_parse(text)

    @FAST
    @given(st.binary(max_size=300))
    def test_parser_any_bytes_get_a_documented_outcome(self, data: bytes) -> None:
        wire.check_parse(data)

    @FAST
    @given(st.text(max_size=60))
    @example("\ud800")  # a lone surrogate cannot be UTF-8 encoded
    @example('{"type": "auth", "token": "\udfff"}')
    def test_parser_any_python_string_gets_a_documented_outcome(self, text: str) -> None:
        wire.check_parse(text)

    @settings(max_examples=40, deadline=None)
    @given(wire.deep_nesting)
    @example("[" * 5000 + "]" * 5000)
    @example('{"type":"auth","token":' + "[" * 5000 + "]" * 5000 + "}")
    @example('{"x":' + "[" * 5000 + "]" * 5000 + ',"type":"auth","token":"a"}')
    def test_parser_deep_nesting_is_invalid_message(self, text: str) -> None:
        outcome = wire.check_parse(text)
        assert isinstance(outcome, m.ParseError)
        assert outcome.code == "invalid_message"

    @settings(max_examples=20, deadline=None)
    @given(
        st.integers(1, 500_000),
        st.sampled_from(["session", "session.vad", "audio", "auth", "fallback"]),
    )
    def test_parser_huge_field_names_are_not_echoed_whole(self, size: int, where: str) -> None:
        name = "n" * size
        docs: dict[str, dict[str, Any]] = {
            "session": {
                "type": "session.update",
                "session": {"provider": "P", "model": "M", name: 1},
            },
            "session.vad": {
                "type": "session.update",
                "session": {"provider": "P", "model": "M", "vad": {name: 1}},
            },
            "audio": {"type": "audio.append", "audio": "AAAA", name: 1},
            "auth": {"type": "auth", "token": "t", name: 1},
            "fallback": {
                "type": "session.update",
                "session": {"provider": "P", "model": "M", "fallback": {name: 1}},
            },
        }
        outcome = wire.check_parse(json.dumps(docs[where]))  # checks the error's length
        assert isinstance(outcome, m.ParseError)
        assert outcome.field is not None and name[:100] in outcome.field  # still named

    @settings(max_examples=15, deadline=None)
    @given(wire.huge_strings)
    def test_parser_huge_strings_get_a_documented_outcome(self, text: str) -> None:
        wire.check_parse(text)


class TestParseCodes:
    @FAST
    @given(wire.message_dicts)
    def test_parser_bad_message_gets_the_code_of_its_type(self, doc: dict[str, Any]) -> None:
        outcome = wire.check_parse(json.dumps(doc))
        if isinstance(outcome, m.ParseError):
            assert outcome.code == wire.expected_parse_code(doc), (doc, outcome.message)
        else:
            assert doc["type"] == outcome.__struct_config__.tag

    @FAST
    @given(wire.json_values.filter(lambda v: not isinstance(v, dict)))
    def test_parser_non_object_is_invalid_message(self, value: Any) -> None:
        outcome = wire.check_parse(json.dumps(value))
        assert isinstance(outcome, m.ParseError) and outcome.code == "invalid_message"

    @FAST
    @given(wire.config_fields["provider"], wire.json_values)
    def test_parser_unknown_config_field_is_named(self, provider: Any, value: Any) -> None:
        doc = {
            "type": "session.update",
            "session": {"provider": "LOCAL", "model": "x", "zz_unknown": value},
        }
        outcome = wire.check_parse(json.dumps(doc))
        assert isinstance(outcome, m.ParseError)
        assert outcome.code == "invalid_session_config"
        assert outcome.field == "session.zz_unknown"

    @FAST
    @given(st.text(max_size=80), st.text(max_size=80))
    def test_parser_unicode_survives_round_trip(self, token: str, prompt: str) -> None:
        auth = wire.check_parse(json.dumps({"type": "auth", "token": token}, ensure_ascii=False))
        assert isinstance(auth, m.Auth) and auth.token == token
        update = wire.check_parse(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"provider": "P", "model": "M", "prompt": prompt},
                }
            )
        )
        assert isinstance(update, m.SessionUpdate) and update.session.prompt == prompt
