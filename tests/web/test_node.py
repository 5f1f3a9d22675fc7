"""Node.js against a real gateway: the public docs' example and the JS client, with real ``node``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests.conftest import ROOT, TEST_KEYS, GatewayProcess
from tests.textnorm import normalize, word_errors
from tests.web.conftest import CLIENT_DIR

DOCS_EXAMPLE = Path(__file__).parents[1] / "compat" / "voicerun_docs_node.mjs"
STREAM_SCRIPT = Path(__file__).with_name("node_client_stream.mjs")
CLIENT_INDEX = CLIENT_DIR / "src" / "index.js"


def references(shared_audio: Path) -> dict[str, str]:
    lines = (shared_audio / "references.tsv").read_text().splitlines()[1:]
    return {row.split("\t")[0]: row.split("\t")[1] for row in lines if row.strip()}


def run_node(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def stream_with_client(
    workdir: Path, gateway: GatewayProcess, audio: Path, **auth: str
) -> list[dict[str, Any]]:
    env = {"GATEWAY_URL": gateway.url, **auth}
    shutil.copy(STREAM_SCRIPT, workdir / STREAM_SCRIPT.name)  # where `import "ws"` resolves
    run = run_node(workdir, STREAM_SCRIPT.name, CLIENT_INDEX.as_uri(), str(audio), env=env)
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert events, run.stdout + run.stderr
    return events


def finals_of(events: list[dict[str, Any]]) -> str:
    return " ".join(e["value"]["text"] for e in events if e["event"] == "completed")


def mint_token(gateway: GatewayProcess) -> str:
    req = urllib.request.Request(
        f"{gateway.http}/v1/tokens",
        data=b"",
        headers={"Authorization": f"Bearer {TEST_KEYS[0]}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        token: str = json.loads(r.read())["token"]
        return token


def test_docs_node_example_prints_finals(
    gateway: GatewayProcess, node_workdir: Path, shared_audio: Path
) -> None:
    source = DOCS_EXAMPLE.read_text()
    script = source.replace('"wss://transcribe.voicerun.com/ws"', f'"{gateway.url}"')
    script = script.replace('"Bearer YOUR_API_KEY"', f'"Bearer {TEST_KEYS[0]}"')
    assert script.count("\n") == source.count("\n") and script != source
    (node_workdir / "example.mjs").write_text(script)
    shutil.copy(shared_audio / "goforward.raw", node_workdir / "audio.raw")
    run = run_node(node_workdir, "example.mjs")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "Ready - start sending audio", run.stdout
    finals = [line.removeprefix("Final: ") for line in lines if line.startswith("Final: ")]
    assert normalize(" ".join(finals)) == "go forward ten meters", run.stdout
    assert lines[-1] == "Closed: 1000", run.stdout


class TestClientInNode:
    def test_client_streams_a_file_with_header_auth(
        self, gateway: GatewayProcess, node_workdir: Path, shared_audio: Path
    ) -> None:
        events = stream_with_client(
            node_workdir, gateway, shared_audio / "goforward.raw", GATEWAY_KEY=TEST_KEYS[0]
        )
        kinds = [e["event"] for e in events]
        assert kinds[:2] == ["created", "updated"], kinds
        assert normalize(finals_of(events)) == "go forward ten meters", events
        assert "speech_started" in kinds and "speech_stopped" in kinds
        completed = next(e["value"] for e in events if e["event"] == "completed")
        assert completed["end_ms"] > completed["start_ms"] >= 0
        assert isinstance(completed["latency_ms"], int) and completed["latency_ms"] >= 0
        done = events[-1]
        assert done["event"] == "done" and done["value"]["code"] == 1000
        seconds = (shared_audio / "goforward.raw").stat().st_size / 32000
        assert abs(done["value"]["audio_seconds"] - seconds) < 0.05

    def test_client_streams_librivox_with_a_token_in_the_auth_message(
        self, gateway: GatewayProcess, node_workdir: Path, shared_audio: Path
    ) -> None:
        name = "sense_and_sensibility_01_austen_64kb-0880.wav"
        samples, rate = soundfile.read(shared_audio / name, dtype="int16")
        assert rate == 16000 and samples.ndim == 1
        raw = node_workdir / "speech.raw"
        raw.write_bytes(np.asarray(samples, "<i2").tobytes())
        events = stream_with_client(node_workdir, gateway, raw, GATEWAY_TOKEN=mint_token(gateway))
        # Whisper tiny.en hears "ill disposed" as "old sposed": two word errors in eight.
        errors, words = word_errors(references(shared_audio)[name], finals_of(events))
        assert errors <= 2 and words == 8, finals_of(events)

    def test_client_reports_a_refused_token_and_does_not_reconnect(
        self, gateway: GatewayProcess, node_workdir: Path, shared_audio: Path
    ) -> None:
        token = mint_token(gateway)
        first = stream_with_client(
            node_workdir, gateway, shared_audio / "goforward.raw", GATEWAY_TOKEN=token
        )
        assert first[-1]["event"] == "done"
        again = stream_with_client(
            node_workdir, gateway, shared_audio / "goforward.raw", GATEWAY_TOKEN=token
        )
        kinds = [e["event"] for e in again]
        assert kinds == ["closed", "connect_failed"], again
        assert again[0]["value"]["code"] == 4001
        assert again[1]["code"] == "unauthorized"


SESSION_SCRIPT = Path(__file__).with_name("node_client_session.mjs")


def run_session_script(
    workdir: Path,
    gateway: GatewayProcess,
    scenario: str,
    session: dict[str, Any],
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """``env``: more for the script (``GATEWAY_KEY``, ``CLIENT_OPTIONS``...)."""
    shutil.copy(SESSION_SCRIPT, workdir / SESSION_SCRIPT.name)  # where `import "ws"` resolves
    run = run_node(
        workdir,
        SESSION_SCRIPT.name,
        CLIENT_INDEX.as_uri(),
        scenario,
        json.dumps(session),
        env={"GATEWAY_URL": gateway.url, "GATEWAY_KEY": TEST_KEYS[0], **(env or {})},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def strict_gateway() -> Iterator[GatewayProcess]:
    """Refuses providers it has no credentials for (``provider_unavailable``)."""
    server = GatewayProcess("web-strict", {"DEEPGRAM_API_KEY": ""}, ["--strict-providers"])
    yield server
    server.stop()


class TestClientConnectRefused:
    """A ``session.update`` the server cannot serve leaves its socket open: connect()
    must fail at once with the server's error (not a ``timeout`` 15 s later) and close it."""

    def assert_refused(self, events: list[dict[str, Any]], code: str, retryable: bool) -> str:
        kinds = [e["event"] for e in events]
        assert kinds[-3:] == ["connect_failed", "closed", "after_failure"], events
        failed = events[-3]
        server_error = [e for e in events if e["event"] == "error"][-1]
        assert failed["code"] == server_error["code"] == code, events
        assert failed["message"] == server_error["message"], events
        assert failed["retryable"] is retryable, events
        assert events[-1]["value"] == "closed" and events[-1]["isOpen"] is False, events
        message: str = failed["message"]
        return message

    def test_provider_error_at_open_rejects_connect(
        self, gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        session = {"provider": "FAULTY", "model": "refuse-on-open", "sample_rate": 16000}
        events = run_session_script(node_workdir, gateway, "connect", session)
        message = self.assert_refused(events, "provider_error", retryable=False)
        assert "authentication refused" in message

    def test_provider_unavailable_rejects_connect(
        self, strict_gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        session = {"provider": "DEEPGRAM", "model": "nova-3", "sample_rate": 16000}
        events = run_session_script(node_workdir, strict_gateway, "connect", session)
        message = self.assert_refused(events, "provider_unavailable", retryable=False)
        assert "DEEPGRAM_API_KEY" in message

    def test_primary_refused_with_a_fallback_connects_to_the_fallback(
        self, gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        """The switch's ``provider_error`` is followed by ``session.updated``: not a refusal."""
        session = {
            "provider": "FAULTY",
            "model": "refuse-on-open",
            "sample_rate": 16000,
            "fallback": {"provider": "FAULTY", "model": "echo"},
        }
        events = run_session_script(node_workdir, gateway, "connect", session)
        kinds = [e["event"] for e in events]
        assert kinds == ["error", "connected", "closed"], events
        assert events[0]["code"] == "provider_error" and "switching" in events[0]["message"]
        assert events[1]["value"]["model"] == "echo", events
        assert events[2]["value"]["code"] == 1000

    def test_fallback_refused_too_rejects_connect(
        self, gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        session = {
            "provider": "FAULTY",
            "model": "refuse-on-open",
            "sample_rate": 16000,
            "fallback": {"provider": "FAULTY", "model": "refuse-on-open"},
        }
        events = run_session_script(node_workdir, gateway, "connect", session)
        assert [e["event"] for e in events].count("error") == 2, events
        self.assert_refused(events, "provider_error", retryable=False)


def test_client_close_twice_resolves_both_calls(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "close-twice", session)
    by_kind = {e["event"]: e["value"] for e in events}
    assert by_kind["settled"] == ["first", "second"], events
    assert [info["code"] for info in by_kind["infos"]] == [1000, 1000], events
    assert by_kind["third"]["code"] == 1000, events


def test_client_latency_stays_true_after_the_sample_rate_changes(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    # echo: a final per 0.5 s of audio, due as soon as the chunk that ends it
    # arrives. Counting the first second's samples at the new rate (as before)
    # put 2 s of audio where 1 s was sent, and timed the last finals from chunks
    # sent up to 1 s earlier.
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "rate-change", session)
    completed = [e["value"] for e in events if e["event"] == "completed"]
    assert [c["end_ms"] for c in completed] == [500, 1000, 1500, 2000], events
    assert all(c["latency_ms"] is not None and c["latency_ms"] < 300 for c in completed), events
    assert events[-1]["event"] == "done" and events[-1]["value"]["code"] == 1000


@pytest.mark.parametrize("audio_format", ["mulaw", "alaw"])
def test_client_latency_is_true_for_one_byte_formats(
    gateway: GatewayProcess, node_workdir: Path, audio_format: str
) -> None:
    # One byte per sample: counting the bytes as pcm16 samples (2 each) halved the
    # audio time sent, so each final was timed from a chunk sent far earlier.
    session = {
        "provider": "FAULTY",
        "model": "echo",
        "sample_rate": 8000,
        "input_audio_format": audio_format,
    }
    events = run_session_script(node_workdir, gateway, "encoded", session)
    completed = [e["value"] for e in events if e["event"] == "completed"]
    assert [c["end_ms"] for c in completed] == [500, 1000, 1500, 2000], events
    assert all(c["latency_ms"] is not None and c["latency_ms"] < 300 for c in completed), events
    assert events[-1]["event"] == "done" and events[-1]["value"]["code"] == 1000


def test_client_latency_is_unknown_for_finals_whose_chunk_was_dropped(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    # 3100 chunks sent before any final is handled: the 3000-entry history drops
    # the first 2 s. Finals ending there were timed from the first kept chunk (as
    # before), far later than their audio left: a latency too low, not unknown.
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "latency-cap", session)
    completed = [e["value"] for e in events if e["event"] == "completed"]
    dropped = [c for c in completed if c["end_ms"] <= 2000]
    kept = [c for c in completed if c["end_ms"] > 2000]
    assert [c["end_ms"] for c in dropped] == [500, 1000, 1500, 2000], events
    assert all(c["latency_ms"] is None for c in dropped), dropped
    assert kept and all(c["latency_ms"] is not None for c in kept), events
    assert events[-1]["event"] == "done" and events[-1]["value"]["audio_seconds"] == 62


class TestClientClosedInfo:
    """``ClosedInfo`` tells a finished session (``session.closed`` arrived, and why)
    from one the client gave up on: both close with 1000."""

    def test_graceful_close_is_finalized(self, gateway: GatewayProcess, node_workdir: Path) -> None:
        session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
        events = run_session_script(node_workdir, gateway, "close-twice", session)
        infos = next(e["value"] for e in events if e["event"] == "infos")
        for info in [*infos, next(e["value"] for e in events if e["event"] == "third")]:
            assert info["code"] == 1000 and info["finalized"] is True, events
            assert info["session_reason"] == "client_close", events

    def test_close_that_times_out_is_not_finalized(
        self, gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        # hang-on-finalize: the server is still finishing when close({timeoutMs: 1000})
        # stops waiting (before its own 5 s drain timeout would end the session).
        session = {"provider": "FAULTY", "model": "hang-on-finalize", "sample_rate": 16000}
        events = run_session_script(node_workdir, gateway, "close-timeout", session)
        done = events[-1]
        assert done["event"] == "done", events
        assert done["value"] == {
            "code": 1000,
            "reason": "",
            "finalized": False,
            "session_reason": None,
            "audio_seconds": None,
        }, events

    def test_idle_timeout_is_the_session_reason(
        self, gateway: GatewayProcess, node_workdir: Path
    ) -> None:
        session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
        events = run_session_script(node_workdir, gateway, "idle", session)
        done = events[-1]
        assert done["event"] == "done", events
        assert done["value"]["code"] == 1000 and done["value"]["finalized"] is True, events
        assert done["value"]["session_reason"] == "idle_timeout", events


def test_client_drained_bounds_the_socket_queue(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    # 10 minutes of audio as fast as the socket takes it: unpaced, the ws queue holds
    # megabytes while the engine works (the client had no way to see or wait on it).
    session = {"provider": "LOCAL", "model": "whisper-tiny.en", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "drained", session)
    stream = next(e["value"] for e in events if e["event"] == "stream")
    # drained(limit) before each chunk: at most the limit plus the chunk just sent.
    assert 0 <= stream["most"] < stream["limit"] + stream["frame"], stream
    done = events[-1]
    assert done["event"] == "done" and done["value"]["finalized"] is True, events
    assert done["value"]["audio_seconds"] == 600, events


def test_client_error_carries_the_field_the_server_named(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 3}
    events = run_session_script(node_workdir, gateway, "connect", session)
    server_error = next(e for e in events if e["event"] == "error")
    failed = next(e for e in events if e["event"] == "connect_failed")
    assert server_error["code"] == failed["code"] == "invalid_session_config", events
    assert server_error["field"] == failed["field"] == "session.sample_rate", events


def create_key(gateway: GatewayProcess, name: str, *options: str) -> str:
    """``transcribe-gateway keys create NAME OPTIONS`` in the server's store: the key."""
    done = subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", "keys", "create", name, *options],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRANSCRIBE_STORE_PATH": str(gateway.store_path)},
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[0]


def test_client_file_loop_and_close_keep_up_with_a_server_reading_slowly(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    # A key limited to 100 messages a second: the server reads the 20 ms chunks at 2x
    # real time and holds the rest unread (backpressure). Before, the whole file sat in
    # the kernel's buffers (bufferedAmount 0), close()'s 2 s counted from when
    # session.close was queued, and the client gave up while the server was still
    # reading: finalized false, the last finals lost. A short keepalive must not take
    # the server working through the backlog for dead (the pongs come as it reads).
    key = create_key(gateway, "web-slow-reader", "--rate", "100")
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
    options = json.dumps({"pingIntervalMs": 500, "pingTimeoutMs": 2000})
    env = {"GATEWAY_KEY": key, "CLIENT_OPTIONS": options}
    events = run_session_script(node_workdir, gateway, "slow-reader", session, env=env)
    done = events[-1]
    assert done["event"] == "done", events
    assert done["value"]["finalized"] is True and done["value"]["code"] == 1000, events
    assert done["value"]["audio_seconds"] == 10 and done["value"]["finals"] == 20, events


@pytest.fixture
def frozen_gateway() -> Iterator[GatewayProcess]:
    """A server of its own, for a test that freezes it (SIGSTOP: a host gone without a FIN)."""
    server = GatewayProcess("web-frozen")
    yield server
    server.proc.send_signal(signal.SIGCONT)
    server.stop()


def run_frozen(
    workdir: Path, server: GatewayProcess, scenario: str, options: dict[str, Any]
) -> dict[str, Any]:
    session = {"provider": "FAULTY", "model": "echo", "sample_rate": 16000}
    env = {
        "SERVER_PID": str(server.proc.pid),
        "CLIENT_OPTIONS": json.dumps(options),
        "HANG_MS": "15000",
    }
    try:
        events = run_session_script(workdir, server, scenario, session, env=env)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    assert events and events[-1]["event"] == "done", events
    done: dict[str, Any] = events[-1]["value"]
    return done


def test_client_keepalive_drops_a_frozen_server(
    frozen_gateway: GatewayProcess, node_workdir: Path
) -> None:
    # The README's file loop: drained() never resolved once the socket stopped taking
    # data. No message, pong or read audio for pingIntervalMs + pingTimeoutMs: dropped.
    done = run_frozen(
        node_workdir,
        frozen_gateway,
        "frozen-keepalive",
        {"pingIntervalMs": 500, "pingTimeoutMs": 1000},
    )
    assert done["outcome"].startswith("stopped after"), done
    assert done["info"]["code"] == 1011 and done["info"]["finalized"] is False, done
    assert done["info"]["reason"].startswith("keepalive timeout"), done
    assert done["ms"] < 8000, done


def test_client_drained_and_close_give_up_in_time_on_a_frozen_server(
    frozen_gateway: GatewayProcess, node_workdir: Path
) -> None:
    # Without keepalive: drained({timeoutMs}) rejects; close({timeoutMs: 1000}) drops the
    # socket and resolves after 1 s (it waited for ws's 30 s close handshake: 1006).
    done = run_frozen(node_workdir, frozen_gateway, "frozen-timeouts", {"pingIntervalMs": 0})
    assert done["drained"] == "rejected: timeout" and done["drainedMs"] < 5000, done
    assert done["info"] == {
        "code": 1000,
        "reason": "",
        "finalized": False,
        "session_reason": None,
        "audio_seconds": None,
    }, done
    assert 900 <= done["closeMs"] < 2000, done


def test_client_sends_no_audio_after_close(gateway: GatewayProcess, node_workdir: Path) -> None:
    # A microphone still running while close() waits (hang-on-finalize: it never
    # finishes): each chunk was sent, and came back as a session_closing error.
    session = {"provider": "FAULTY", "model": "hang-on-finalize", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "audio-after-close", session)
    done = events[-1]
    assert done["event"] == "done", events
    assert done["value"]["isOpen"] is False, events
    assert done["value"]["info"]["code"] == 1000, events
    assert [e for e in events if e["event"] == "error"] == [], events
    assert done["value"]["afterClosed"] == "client_error", events  # closed: it throws


def test_client_stops_sending_at_the_servers_session_closing(
    gateway: GatewayProcess, node_workdir: Path
) -> None:
    # The server ends the session (idle timeout) and takes its time finishing
    # (hang-on-finalize, until its 5 s drain timeout): a microphone sending meanwhile got
    # one session_closing error per 20 ms chunk.
    session = {"provider": "FAULTY", "model": "hang-on-finalize", "sample_rate": 16000}
    events = run_session_script(node_workdir, gateway, "audio-after-server-end", session)
    done = events[-1]
    assert done["event"] == "done", events
    assert done["value"]["isOpenAfterError"] is False, events
    closing = [e for e in events if e["event"] == "error" and e["code"] == "session_closing"]
    assert 1 <= len(closing) <= 3 and done["value"]["sent"] <= 3, events
