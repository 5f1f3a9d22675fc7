"""The SDK and the ``stream`` command against the real gateway process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_AUDIO, TEST_KEYS, GatewayProcess
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.client import (
    Event,
    TranscribeClient,
    TranscribeError,
    TranscribeQuotaExceeded,
    TranscribeUnauthorized,
)
from transcribe_gateway.protocol.messages import (
    Error,
    FallbackConfig,
    SessionUpdated,
    TranscriptionCompleted,
    TranscriptionPartial,
)

JFK = SHARED_AUDIO / "jfk.flac"


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


ECHO = FallbackConfig(provider="FAULTY", model="echo")
"""A fallback that gives a final per 0.5 s of audio (tests/plugins/faulty.py)."""


async def test_configure_returns_the_fallback_when_the_primary_cannot_open(
    gateway: GatewayProcess,
) -> None:
    # The server answers with provider_error ("...; switching to the fallback ...")
    # and then session.updated for the fallback: that is configure()'s answer.
    # (crash-on-open is an engine bug: the server closes 1011, no switch.)
    primary = "refuse-on-open"
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[0]) as client:
        config = await client.configure(provider="FAULTY", model=primary, fallback=ECHO)
        assert (config.provider, config.model) == ("FAULTY", "echo")
        assert (config.requested_provider, config.requested_model) == ("FAULTY", primary)
        assert client.config == config
        queued = client.drain_events()  # both answers stay queued, in order
        assert [type(e) for e in queued[1:]] == [Error, SessionUpdated], queued
        switch = queued[1]
        assert isinstance(switch, Error) and switch.error.code == "provider_error"
        assert "switching to the fallback" in switch.error.message
        result = await client.stream_samples(np.zeros(16000, np.int16), fast=True)
    assert [f.text for f in result.finals] == ["chunk 0", "chunk 1"]


async def test_configure_raises_when_the_fallback_cannot_open_either(
    gateway: GatewayProcess,
) -> None:
    refused = FallbackConfig(provider="FAULTY", model="refuse-on-open")
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[0]) as client:
        with pytest.raises(TranscribeError) as caught:
            await client.configure(provider="FAULTY", model="refuse-on-open", fallback=refused)
        assert client.config is None  # no session.updated came
        errors = [e for e in client.drain_events() if isinstance(e, Error)]
    assert caught.value.code == "provider_error"
    assert len(errors) == 2 and caught.value.message == errors[1].error.message


async def test_config_follows_a_switch_to_the_fallback_mid_stream(
    gateway: GatewayProcess,
) -> None:
    # fail-after-audio fails once 0.5 s arrived: the server switches to the
    # fallback and says so with a session.updated of its own.
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[0]) as client:
        config = await client.configure(provider="FAULTY", model="fail-after-audio", fallback=ECHO)
        assert config.model == "fail-after-audio"
        result = await client.stream_samples(np.zeros(32000, np.int16), fast=True)
        updates = [e.session for e in result.events if isinstance(e, SessionUpdated)]
        assert client.config is not None and client.config.model == "echo"
    assert [u.model for u in updates] == ["fail-after-audio", "echo"], result.events
    assert client.config == updates[-1] and updates[-1].requested_model == "fail-after-audio"
    assert [e.code for e in result.errors] == ["provider_error"]
    assert len(result.finals) == 4, result.finals  # the fallback got all of the 2 s


async def next_error(client: TranscribeClient) -> Error:
    """The next ``error`` the client receives (10 s at most)."""
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, Error):
                return event
    raise AssertionError("the connection ended without an error")


async def test_configure_after_a_failure_is_not_answered_by_the_dropped_audio(
    gateway: GatewayProcess,
) -> None:
    # With no fallback, audio after the failure is dropped with an error (one a
    # second). It was a provider_error, which configure() took for the answer to
    # a session.update sent while such audio was in flight.
    async with TranscribeClient.connect(gateway.url, TEST_KEYS[0]) as client:
        await client.configure(provider="FAULTY", model="fail-after-audio")
        chunk = np.zeros(320, np.int16).tobytes()
        for _ in range(30):  # 0.6 s: it fails at 0.5 s
            await client.send_audio(chunk)
        failure = await next_error(client)
        assert failure.error.code == "provider_error"
        await asyncio.sleep(1.1)  # the next dropped chunk gets its error at once
        await client.send_audio(chunk)
        config = await client.configure(provider="FAULTY", model="echo")
        assert config.model == "echo"
        dropped = await next_error(client)
        assert dropped.error.code == "session_not_configured", dropped


def keys_command(server: GatewayProcess, *args: str) -> str:
    """``transcribe-gateway keys ARGS`` in the server's store: its output."""
    done = subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRANSCRIBE_STORE_PATH": str(server.store_path)},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def create_key(server: GatewayProcess, name: str, *options: str) -> str:
    """``transcribe-gateway keys create NAME OPTIONS`` in the server's store: the key."""
    return keys_command(server, "create", name, *options)


async def test_sdk_refusals_raise_the_documented_exceptions() -> None:
    # The server refuses with an error, then a close: too_many_sessions then 4029,
    # forbidden then 4001. open() raises the documented exception for each, keeping
    # the server's explanation.
    server = GatewayProcess("one-session-per-key", env={"TRANSCRIBE_MAX_SESSIONS_PER_KEY": "1"})
    try:
        reader = await asyncio.to_thread(create_key, server, "reader", "--scope", "usage")
        async with TranscribeClient.connect(server.url, TEST_KEYS[0]):
            with pytest.raises(TranscribeQuotaExceeded) as over:
                async with TranscribeClient.connect(server.url, TEST_KEYS[0]):
                    pytest.fail("a second session of the key must be refused")
            async with TranscribeClient.connect(server.url, TEST_KEYS[1]) as other:
                assert other.session_id.startswith("ts_")  # the limit is per key
        with pytest.raises(TranscribeUnauthorized) as forbidden:
            async with TranscribeClient.connect(server.url, reader):
                pytest.fail("a key without the transcribe scope must be refused")
    finally:
        server.stop()
    assert (over.value.code, over.value.reason) == (4029, "Too many sessions")
    assert over.value.error is not None and over.value.error.code == "too_many_sessions"
    assert "too_many_sessions" in str(over.value) and over.value.error.message in str(over.value)
    assert forbidden.value.code == 4001
    assert forbidden.value.error is not None and forbidden.value.error.code == "forbidden"


async def test_a_quota_reached_mid_stream_raises_with_the_servers_error(
    gateway: GatewayProcess,
) -> None:
    # 0.05 audio minutes: the server sends error quota_exceeded, then closes 4029,
    # 3 s into the stream. The exception's error was None (only a refusal before
    # session.created kept it).
    key = await asyncio.to_thread(
        create_key, gateway, "quota-mid-stream", "--audio-minutes", "0.05"
    )
    async with TranscribeClient.connect(gateway.url, key) as client:
        await client.configure(provider="FAULTY", model="echo")
        with pytest.raises(TranscribeQuotaExceeded) as caught:
            await client.stream_samples(np.zeros(5 * 16000, np.int16), fast=True)
    assert caught.value.code == 4029
    assert caught.value.error is not None and caught.value.error.code == "quota_exceeded"
    assert "audio minutes" in caught.value.error.message
    assert "quota_exceeded" in str(caught.value)


async def test_a_key_revoked_mid_stream_raises_with_the_servers_error(
    gateway: GatewayProcess,
) -> None:
    # The server rechecks open sessions' keys (every 2 s): error unauthorized, then 4001.
    key = await asyncio.to_thread(create_key, gateway, "revoked-mid-stream")
    async with TranscribeClient.connect(gateway.url, key) as client:
        await client.configure(provider="FAULTY", model="echo")
        streaming = asyncio.create_task(client.stream_samples(np.zeros(20 * 16000, np.int16)))
        await asyncio.to_thread(keys_command, gateway, "revoke", "revoked-mid-stream")
        with pytest.raises(TranscribeUnauthorized) as caught:
            await asyncio.wait_for(streaming, 15)
    assert caught.value.code == 4001
    assert caught.value.error is not None and caught.value.error.code == "unauthorized"
    assert "revoked" in caught.value.error.message


async def test_sdk_reports_the_audio_sent_when_a_shutdown_ends_the_stream() -> None:
    # SIGTERM inside the second utterance, while jfk.flac (11 s) streams in real time:
    # the session ends early (after decoding that utterance), and the result counts
    # what was sent, not the whole file.
    server = GatewayProcess("shutdown-mid-stream")
    chunk_s = 0.1
    finals, signalled = 0, False

    def shut_down_inside_the_second_utterance(event: Event) -> None:
        nonlocal finals, signalled
        finals += isinstance(event, TranscriptionCompleted)
        if finals and isinstance(event, TranscriptionPartial) and not signalled:
            signalled = True  # once: a second SIGTERM means "exit now"
            server.proc.send_signal(signal.SIGTERM)

    try:
        async with TranscribeClient.connect(server.url, TEST_KEYS[0]) as client:
            await client.configure()
            result = await client.stream_file(
                JFK, chunk_ms=round(chunk_s * 1000), on_event=shut_down_inside_the_second_utterance
            )
            sent = client.audio_seconds_sent
    finally:
        server.stop()
    assert result.closed is not None and result.closed.reason == "shutdown"
    usage = result.closed.usage.audio_seconds
    assert result.audio_seconds == pytest.approx(sent)
    assert result.audio_seconds < len(read_audio(JFK)) / 16000
    # Sending stops at the first session_closing: a chunk or so the server dropped
    # (0.5 s of room for a loaded machine; the whole file would be 11 s).
    assert usage - 1e-3 <= result.audio_seconds <= usage + 0.5, [e.code for e in result.errors]


def cli_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "transcribe_gateway", "stream", "--url", url, *args]


CLI_ENV = {**os.environ, "TRANSCRIBE_API_KEY": TEST_KEYS[0]}


def run_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``transcribe-gateway stream --url <gateway> ARGS`` as a user runs it."""
    return subprocess.run(
        cli_command(gateway.url, *args),
        capture_output=True,
        text=True,
        timeout=120,
        env=CLI_ENV,
        cwd=ROOT,
    )


def test_stream_command_reports_the_audio_sent_when_a_shutdown_ends_it() -> None:
    # As above, through the command: its summary line says what was sent.
    server = GatewayProcess("shutdown-cli")
    try:
        cli = subprocess.Popen(
            cli_command(server.url, "--json", str(JFK)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CLI_ENV,
            cwd=ROOT,
        )
        assert cli.stdout is not None
        kinds = (json.loads(line)["type"] for line in cli.stdout)
        assert "transcription.completed" in kinds  # consumes up to the first final
        assert "transcription.partial" in kinds  # the second utterance: shut down now
        server.proc.send_signal(signal.SIGTERM)
        _, err = cli.communicate(timeout=120)
    finally:
        server.stop()
    sent = re.search(r"audio: (\d+\.\d+) s sent in real time", err)
    usage = re.search(r"closed \(shutdown\): usage (\d+\.\d+) s", err)
    assert sent is not None and usage is not None, err
    assert float(sent[1]) < 11.0
    # Sending stops a chunk or so after the first session_closing (room as above).
    assert float(usage[1]) - 0.01 <= float(sent[1]) <= float(usage[1]) + 0.5, err


def test_stream_command_exits_quietly_when_stdout_is_closed(gateway: GatewayProcess) -> None:
    # `stream --json FILE | head -1`: once the reader goes, the next write fails
    # (EPIPE). That is no connection failure, and no error to report.
    cli = subprocess.Popen(
        cli_command(gateway.url, "--json", str(JFK)),  # real time: events keep coming
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
        cwd=ROOT,
    )
    assert cli.stdout is not None and cli.stderr is not None
    assert json.loads(cli.stdout.readline())["type"] == "session.created"
    cli.stdout.close()
    assert cli.wait(timeout=120) == 141
    assert cli.stderr.read() == ""


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


def start_cli(gateway: GatewayProcess, *args: str) -> subprocess.Popen[str]:
    """The command as a terminal runs it: Ctrl-C (SIGINT) not ignored."""
    return subprocess.Popen(
        cli_command(gateway.url, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
        cwd=ROOT,
        # A job started in the background by a shell without job control ignores SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_stream_command_ctrl_c_ends_the_session_and_prints_its_last_finals(
    gateway: GatewayProcess,
) -> None:
    cli = start_cli(gateway, "--json", str(JFK))  # real time: 11 s
    assert cli.stdout is not None
    kinds = (json.loads(line)["type"] for line in cli.stdout)
    assert "transcription.completed" in kinds  # consumes up to the first final
    assert "transcription.partial" in kinds  # inside the second utterance: Ctrl-C now
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted: ending the session" in err
    events = [json.loads(line) for line in out.splitlines()]
    # The utterance under way is finalized, then the session ends as for session.close.
    assert [e["type"] for e in events].count("transcription.completed") >= 1, out
    assert events[-1]["type"] == "session.closed" and events[-1]["reason"] == "client_close"
    sent = re.search(r"audio: (\d+\.\d+) s sent in real time", err)
    assert sent is not None and float(sent[1]) < 10.0, err


def test_stream_command_second_ctrl_c_quits_at_once(gateway: GatewayProcess) -> None:
    # hang-on-finalize never finishes: a graceful end would wait for the server's
    # drain timeout (5 s here). The second Ctrl-C does not wait.
    cli = start_cli(
        gateway, "--json", "--provider", "FAULTY", "--model", "hang-on-finalize", str(JFK)
    )
    assert cli.stdout is not None
    kinds = (json.loads(line)["type"] for line in cli.stdout)
    assert "transcription.completed" in kinds  # streaming (a final per 0.5 s)
    cli.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert cli.poll() is None  # the first Ctrl-C waits for the session to end
    cli.send_signal(signal.SIGINT)
    quit_at = time.monotonic()
    out, err = cli.communicate(timeout=60)
    assert time.monotonic() - quit_at < 3
    assert "interrupted: ending the session" in err
    assert cli.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "session.closed" not in out
