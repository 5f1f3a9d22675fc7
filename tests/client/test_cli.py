"""The ``stream`` command against the scripted server of ``test_sdk.py``."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_AUDIO
from transcribe_gateway.audio.decode import encode_mulaw
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.client.cli import _Printer, add_stream_parser, main, run_stream
from transcribe_gateway.protocol.messages import TranscriptionCompleted, TranscriptionPartial

from .test_sdk import GOOD_KEY, SESSION_ID, FakeGateway, fake_gateway

__all__ = ["fake_gateway"]  # the fixture, shared with test_sdk

AUDIO = SHARED_AUDIO
GOFORWARD = AUDIO / "goforward.raw"
JFK = AUDIO / "jfk.flac"
SRC = Path(__file__).resolve().parents[2] / "src"
FINAL_LINE = re.compile(r"^\[\d+\.\d\d-\d+\.\d\d\] \S.*$")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="transcribe-gateway")
    add_stream_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["stream", *argv])


async def test_json_output_is_one_object_per_line(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(str(GOFORWARD), "--url", fake_gateway.url, "--key", GOOD_KEY, "--fast", "--json")
    assert await run_stream(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    events = [json.loads(line) for line in lines]
    assert out.endswith("\n")
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["session.created", "session.updated", "speech.started"]
    assert kinds[-1] == "session.closed"
    assert kinds.count("transcription.completed") == 3  # 2.79 s: one per second
    assert events[0]["session"]["id"] == SESSION_ID
    assert events[-1]["usage"]["audio_seconds"] == pytest.approx(2.786, abs=0.01)
    rec = await fake_gateway.recorded()
    assert rec.authorization == f"Bearer {GOOD_KEY}"
    assert rec.types[-1] == "session.close"
    sent = np.frombuffer(b"".join(rec.chunks), dtype="<i2")
    assert np.array_equal(sent, read_audio(GOFORWARD))


async def test_human_output_on_flac(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(
        str(JFK), "--url", fake_gateway.url, "--key", GOOD_KEY, "--fast", "--auth", "message"
    )
    assert await run_stream(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 11  # jfk.flac is 11 s: one final per second, no partials
    assert all(FINAL_LINE.match(line) for line in lines), lines
    assert lines[0] == "[0.00-1.00] utterance 0"
    assert "\r" not in captured.out
    assert "time to first partial:" in captured.err
    assert "final latency: median" in captured.err
    assert f"session {SESSION_ID} closed (client_close): usage 11.00 s" in captured.err
    rec = await fake_gateway.recorded()
    assert rec.frames[0] == {"type": "auth", "token": GOOD_KEY}


async def test_mulaw_format_and_rate(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(
        str(GOFORWARD),
        *("--url", fake_gateway.url, "--key", GOOD_KEY, "--fast"),
        *("--format", "mulaw", "--rate", "8000", "--model", "m", "--prompt", "go, forward"),
    )
    assert await run_stream(args) == 0
    capsys.readouterr()
    rec = await fake_gateway.recorded()
    assert rec.updates == [
        {
            "provider": "LOCAL",
            "model": "m",
            "language": "en",
            "input_audio_format": "mulaw",
            "sample_rate": 8000,
            "prompt": "go, forward",
        }
    ]
    # --rate is also the rate of the raw input file: read as 8 kHz, sent as is.
    assert b"".join(rec.chunks) == encode_mulaw(read_audio(GOFORWARD, rate=8000, raw_rate=8000))
    assert {len(c) for c in rec.chunks[:-1]} == {160}


async def test_missing_file_exits_2_without_connecting(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = parse(str(tmp_path / "nope.wav"), "--url", fake_gateway.url)
    assert await run_stream(args) == 2
    assert "nope.wav" in capsys.readouterr().err
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    assert await run_stream(parse(str(garbage), "--url", fake_gateway.url)) == 2
    assert fake_gateway.sessions == []


async def test_server_errors_exit_1(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    base = (str(GOFORWARD), "--url", fake_gateway.url, "--fast")
    assert await run_stream(parse(*base, "--key", "wrong")) == 1
    assert "unauthorized" in capsys.readouterr().err

    assert await run_stream(parse(*base, "--key", GOOD_KEY, "--provider", "NOPE", "--json")) == 1
    captured = capsys.readouterr()
    assert "invalid_session_config" in captured.err
    assert "session.provider" in captured.err
    kinds = [json.loads(line)["type"] for line in captured.out.splitlines()]
    assert kinds == ["session.created", "error"]

    fake_gateway.abort_after_ms = 500
    assert await run_stream(parse(*base, "--key", GOOD_KEY)) == 1
    assert "1011" in capsys.readouterr().err


async def test_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = parse(str(GOFORWARD), "--url", f"ws://127.0.0.1:{port}/ws")
    assert await run_stream(args) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["stream"],
        ["stream", "x.wav", "--rate", "100"],
        ["stream", "x", "--format", "x"],
    ):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    capsys.readouterr()


def test_module_runs_standalone(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "transcribe_gateway.client.cli", "stream", str(tmp_path / "x.wav")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "x.wav" in proc.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_partials_on_one_live_line_only_on_a_tty() -> None:
    partial = TranscriptionPartial(utterance_id="u", text="hello")
    final = TranscriptionCompleted(utterance_id="u", text=" hello world", start_ms=0, end_ms=1500)
    tty, pipe = _Tty(), io.StringIO()
    for out in (tty, pipe):
        printer = _Printer(json_lines=False, out=out, err=io.StringIO())
        printer.on_event(partial)
        printer.on_event(final)
    assert tty.getvalue() == "\r\x1b[Khello\r\x1b[K[0.00-1.50] hello world\n"
    assert pipe.getvalue() == "[0.00-1.50] hello world\n"


async def test_a_session_cut_before_session_closed_exits_1(
    fake_gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1001 mid-stream (a server's heartbeat cut a --fast stream): the transcript
    # is incomplete. It used to print "ended without session.closed" and exit 0.
    fake_gateway.abort_after_ms = 1500
    fake_gateway.abort_code = 1001
    args = parse(str(JFK), "--url", fake_gateway.url, "--key", GOOD_KEY, "--fast")
    assert await run_stream(args) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["[0.00-1.00] utterance 0"]  # the finals that came
    assert "1001" in captured.err and "before session.closed" in captured.err, captured.err
    # Then the summary, as after any stream: what was sent, and the finals' timing.
    assert "final latency: median" in captured.err and "over 1 final(s)" in captured.err
    assert "ended without session.closed" in captured.err.splitlines()[-1]


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:99999/ws", "ws://127.0.0.1:abc/ws", "ws://[::1/ws", "http://x/ws"]
)
async def test_a_malformed_url_exits_2_with_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # urllib's ValueError (bad port, bad IPv6 literal) ended in a traceback, exit 1.
    assert await run_stream(parse(str(JFK), "--url", url)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: --url {url!r}: ") and captured.err.count("\n") == 1
