"""The SDK and the ``stream`` command against the real gateway process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_AUDIO, TEST_KEYS, GatewayProcess
from tests.textnorm import normalize
from transcribe_gateway.client import TranscribeClient, TranscribeUnauthorized


async def test_sdk_streams_a_file_and_gets_finals(gateway: GatewayProcess) -> None:
    # The README's snippet, against the real server.
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[0]) as client:
        config = await client.configure(
            provider="LOCAL", model="whisper-tiny.en", sample_rate=16000
        )
        assert config.provider == "LOCAL"
        result = await client.stream_file(SHARED_AUDIO / "goforward.raw", fast=True)
    assert normalize(result.transcript) == "go forward ten meters"
    assert result.closed is not None and result.closed.usage.audio_seconds == pytest.approx(
        2.786, abs=0.01
    )
    assert result.finals[0].words


async def test_sdk_first_message_auth_and_bad_key(gateway: GatewayProcess) -> None:
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[1], auth="message") as client:
        assert client.session_id.startswith("ts_")
    with pytest.raises(TranscribeUnauthorized):
        async with TranscribeClient.connect(gateway.url, "wrong"):
            pass


def run_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``transcribe-gateway stream --url <gateway> ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", "stream", "--url", gateway.url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TRANSCRIBE_API_KEY": TEST_KEYS[0]},
        cwd=ROOT,
    )


def test_stream_command_prints_finals_and_timings(gateway: GatewayProcess) -> None:
    run = run_cli(gateway, str(SHARED_AUDIO / "jfk.flac"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("[") for line in lines), run.stdout
    assert "country" in normalize(run.stdout)
    assert "time to first partial" in run.stderr and "final latency" in run.stderr


def test_stream_command_json(gateway: GatewayProcess) -> None:
    run = run_cli(
        gateway,
        "--fast",
        "--json",
        "--format",
        "mulaw",
        "--rate",
        "8000",
        str(SHARED_AUDIO / "cards-001.wav"),
    )
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert events[1]["session"]["input_audio_format"] == "mulaw"
    assert events[-1]["type"] == "session.closed"
    text = " ".join(e["text"] for e in events if e["type"] == "transcription.completed")
    assert normalize(text) == "ten of clubs"
