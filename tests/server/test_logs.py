"""Logging: a client's malformed frames are not reported as the server's errors, and
what a client wrote cannot pass for fields or lines of the server's own."""

from __future__ import annotations

import logging

import pytest

from transcribe_gateway.server.logs import ClientFaultsAreInfo, TextFormatter


def picows_record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, None)


@pytest.mark.parametrize(("threshold", "shown"), [(logging.WARNING, False), (logging.INFO, True)])
def test_frame_parser_errors_are_info(threshold: int, shown: bool) -> None:
    record = picows_record("picows.server.21", "WS parser error: (1002, 'un-masked frame')")
    assert ClientFaultsAreInfo(threshold).filter(record) is shown
    assert record.levelname == "INFO"


def test_other_errors_stay_errors() -> None:
    keep = ClientFaultsAreInfo(logging.WARNING)
    for record in (
        picows_record("picows.server.21", "Unhandled exception from user's WSListener"),
        picows_record("transcribe_gateway.server", "WS parser error lookalike"),
    ):
        assert keep.filter(record)
        assert record.levelname == "ERROR"


def test_text_fields_from_clients_cannot_pass_for_other_fields_or_lines() -> None:
    record = logging.makeLogRecord(
        {
            "msg": "websocket refused",
            "origin": "https://evil.example level=INFO key=key_admin",
            "reason": "a\nforged line",
            "provider": "LOCAL",
            "empty": "",
        }
    )
    line = TextFormatter().format(record)
    assert line.endswith(
        ' origin="https://evil.example level=INFO key=key_admin"'
        ' reason="a\\nforged line" provider=LOCAL empty=""'
    ), line
    assert "\n" not in line
