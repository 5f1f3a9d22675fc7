"""Session lifecycle: close flush, idle timeout, vanished clients, SIGTERM drain, health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from tests.conftest import ARTIFACTS, ROOT, TEST_KEYS, GatewayProcess, free_port
from tests.server.wsutil import collect, connect, finals, open_session, recv, recv_type, send_audio
from tests.textnorm import normalize
from transcribe_gateway.audio.files import read_audio


async def wait_for_sessions(
    server: GatewayProcess, count: int, timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if health["sessions"] == count or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.1)


class TestSessionClose:
    async def test_close_right_after_speech_loses_no_trailing_words(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        # The file ends right after "meters": no silence for the VAD to end on.
        audio = read_audio(shared_audio / "goforward.raw")
        ws, _ = await open_session(gateway.url)
        await send_audio(ws, audio[: int(2.35 * 16000)])
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        assert normalize(finals(messages)) == "go forward ten meters"
        closed = messages[-1]
        assert closed["type"] == "session.closed"
        assert closed["reason"] == "client_close"
        assert closed["usage"]["audio_seconds"] == pytest.approx(2.35, abs=0.02)
        assert ws.close_code == 1000
        # Order for the utterance: started, partial*, completed, stopped, then closed.
        kinds = [m["type"] for m in messages if m["type"] != "transcription.partial"]
        assert kinds == [
            "speech.started",
            "transcription.completed",
            "speech.stopped",
            "session.closed",
        ]

    async def test_completed_carries_timing_and_words(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        audio = read_audio(shared_audio / "goforward.raw")
        ws, _ = await open_session(gateway.url)
        await send_audio(ws, np.concatenate([audio, np.zeros(16000, np.int16)]))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 60)
        (done,) = [m for m in messages if m["type"] == "transcription.completed"]
        (started,) = [m for m in messages if m["type"] == "speech.started"]
        (stopped,) = [m for m in messages if m["type"] == "speech.stopped"]
        assert done["utterance_id"] == started["utterance_id"] == stopped["utterance_id"]
        assert 0 <= done["start_ms"] < 600 and 2000 < done["end_ms"] < 3500
        words = done["words"]
        assert [normalize(w["word"]) for w in words] == ["go", "forward", "ten", "meters"]
        for w in words:
            assert done["start_ms"] <= w["start_ms"] <= w["end_ms"] <= done["end_ms"] + 50
            assert 0.0 <= w["confidence"] <= 1.0
        assert [w["start_ms"] for w in words] == sorted(w["start_ms"] for w in words)

    async def test_close_before_configuration(self, gateway: GatewayProcess) -> None:
        ws = await websockets.connect(
            gateway.url, additional_headers={"Authorization": "Bearer test-key-alpha-0123456789"}
        )
        await recv(ws)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 10)
        assert [m["type"] for m in messages] == ["session.closed"]
        assert messages[0]["usage"]["audio_seconds"] == 0
        assert ws.close_code == 1000

    async def test_close_waits_for_finals_queued_behind_other_sessions(
        self, shared_audio: Path
    ) -> None:
        # One decode worker and a 2.5 s drain bound; four sessions each close with three
        # utterances still to decode (~0.8 s each here), so the last waits for a worker
        # several times the bound.  The pool finishing the others' decodes is progress,
        # so no session is cut off with a provider_error.  (The bound is three decodes
        # long: a bound near one decode's time flaked on a loaded machine.)
        drain_timeout_s = 2.5
        server = GatewayProcess(
            "drain-backlog",
            env={
                "TRANSCRIBE_LOCAL_WORKERS": "1",
                "TRANSCRIBE_DRAIN_TIMEOUT_S": str(drain_timeout_s),
            },
        )
        speech = read_audio(shared_audio / "sense_and_sensibility_01_austen_64kb-0870.wav")
        pause = np.zeros(16000, dtype=np.int16)
        audio = np.concatenate([speech, pause, speech, pause, speech])

        async def close_after_speech() -> tuple[list[dict[str, Any]], float]:
            ws, _ = await open_session(server.url, retry_busy=True)
            await send_audio(ws, audio)
            await ws.send(json.dumps({"type": "session.close"}))
            closing = time.monotonic()
            messages = await collect(ws, 90)
            return messages, time.monotonic() - closing

        try:
            results = await asyncio.gather(*(close_after_speech() for _ in range(4)))
        finally:
            server.stop()
        for messages, _ in results:
            assert not [m for m in messages if m["type"] == "error"], messages
            assert normalize(finals(messages)).count("dashwood") == 3, finals(messages)
            assert messages[-1]["type"] == "session.closed"
        longest = max(waited for _, waited in results)
        assert longest > drain_timeout_s, (
            f"the last close waited {longest:.1f} s: the finals did not queue, "
            "so the test no longer tests the backlog"
        )


class TestIdleTimeout:
    async def test_listening_client_gets_final_then_closed(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        # A client that sends its audio and only listens (the public docs' example) still ends.
        audio = read_audio(shared_audio / "goforward.raw")
        ws, _ = await open_session(gateway.url)
        await send_audio(ws, audio)
        started = time.monotonic()
        messages = await collect(ws, 30)
        waited = time.monotonic() - started
        assert normalize(finals(messages)) == "go forward ten meters"
        assert messages[-1]["type"] == "session.closed"
        assert messages[-1]["reason"] == "idle_timeout"
        assert ws.close_code == 1000
        assert 2.5 < waited < 15  # idle timeout is 3 s in the test server

    async def test_unconfigured_idle_session_is_closed(self, gateway: GatewayProcess) -> None:
        ws = await websockets.connect(
            gateway.url, additional_headers={"Authorization": "Bearer test-key-alpha-0123456789"}
        )
        await recv(ws)
        messages = await collect(ws, 15)
        assert [m["type"] for m in messages] == ["session.closed"]
        assert messages[0]["reason"] == "idle_timeout"

    async def test_refused_session_update_still_resets_the_clock(
        self, gateway: GatewayProcess
    ) -> None:
        # A client retrying its configuration (say, while the engine is busy) is not
        # idle: every session.update resets the clock, as docs/protocol.md says.
        ws = await connect(gateway.url)
        assert (await recv(ws))["type"] == "session.created"
        bad = {"provider": "LOCAL", "model": "no-such-model"}
        for _ in range(5):  # 5 s, idle timeout 3 s
            await ws.send(json.dumps({"type": "session.update", "session": bad}))
            assert (await recv(ws, 10))["type"] == "error"
            await asyncio.sleep(1.0)
        good = {"provider": "LOCAL", "model": "whisper-tiny.en"}
        await ws.send(json.dumps({"type": "session.update", "session": good}))
        assert (await recv(ws, 10))["type"] == "session.updated"
        await ws.close()


class TestVanishedClient:
    async def test_killed_client_leaves_no_session_or_engine_behind(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        before = await wait_for_sessions(gateway, 0)
        assert before["sessions"] == 0
        audio = read_audio(shared_audio / "sense_and_sensibility_01_austen_64kb-0870.wav")
        sockets = []
        for model in ("whisper-tiny.en", "pocketsphinx-en-us"):
            ws, _ = await open_session(gateway.url, model=model)
            await send_audio(ws, audio[: 3 * 16000])  # mid-utterance
            sockets.append(ws)
        during = gateway.health()
        assert during["sessions"] == 2
        assert during["streams"]["LOCAL"] == {"whisper": 1, "sphinx": 1}
        for ws in sockets:
            ws.transport.abort()  # no close frame: the client just vanishes
        after = await wait_for_sessions(gateway, 0)
        assert after["sessions"] == 0
        assert after["streams"]["LOCAL"] == {"whisper": 0, "sphinx": 0}
        # ...and the server still serves.
        ws, _ = await open_session(gateway.url)
        await ws.close()

    async def test_client_vanishing_while_its_session_drains_frees_it_at_once(
        self, gateway: GatewayProcess
    ) -> None:
        await wait_for_sessions(gateway, 0)
        # An engine that never finishes: draining would take the 5 s drain timeout.
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="hang-on-finalize")
        await send_audio(ws, np.zeros(8000, np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        await asyncio.sleep(0.2)
        ws.transport.abort()
        started = time.monotonic()
        assert (await wait_for_sessions(gateway, 0, timeout=4))["sessions"] == 0
        assert time.monotonic() - started < 2.0

    async def test_an_engine_that_only_revises_a_partial_does_not_hold_the_close(
        self, gateway: GatewayProcess
    ) -> None:
        # Each partial restarted the drain's clock: a provider that kept revising
        # its interim result after the finalize held session.close for ever.
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="revising")
        await send_audio(ws, np.zeros(8000, np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        started = time.monotonic()
        messages = await collect(ws, 30)
        assert time.monotonic() - started < 15  # the 5 s drain timeout, not for ever
        errors = [m["error"] for m in messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["provider_error"], messages
        assert "while finalizing" in errors[0]["message"]
        # What it last said is kept as the final, before the error.
        finals = [
            (i, m["text"]) for i, m in enumerate(messages) if m["type"] == "transcription.completed"
        ]
        assert finals[0][1] == "chunk 0", finals
        assert finals[1][1].startswith("still"), finals
        assert finals[1][0] < messages.index({"type": "error", "error": errors[0]})
        assert messages[-1]["type"] == "session.closed" and ws.close_code == 1000

    async def test_an_engine_whose_partial_grows_is_given_its_time_to_finish(
        self, gateway: GatewayProcess
    ) -> None:
        # A provider working through one long utterance after the finalize says
        # so only with partials; a partial with more words than the utterance's
        # last is progress, where a revision of the same words is not (above).
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="backlog")
        await send_audio(ws, np.zeros(8000, np.int16))
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert not [m for m in messages if m["type"] == "error"], messages
        finals = [m["text"] for m in messages if m["type"] == "transcription.completed"]
        # 6 s of growing partials: past the 5 s drain timeout.
        assert finals == ["chunk 0", " ".join(f"w{n}" for n in range(20))], finals
        assert messages[-1]["type"] == "session.closed" and ws.close_code == 1000

    async def test_an_engine_replaced_by_an_update_is_given_its_time_to_finish(
        self, gateway: GatewayProcess
    ) -> None:
        # The replaced engine works through its backlog (6 s of growing partials)
        # while the session closes: the close waited 5 s in all for it, then cut
        # it off without a word: no final, no speech.stopped, no error.
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="backlog")
        await send_audio(ws, np.zeros(8000, np.int16))
        update = {"provider": "FAULTY", "model": "echo"}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await recv_type(ws, "session.updated")
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert not [m for m in messages if m["type"] == "error"], messages
        backlog = " ".join(f"w{n}" for n in range(20))
        final = next(m for m in messages if m.get("text") == backlog)
        stopped = [m for m in messages if m["type"] == "speech.stopped"]
        assert final["utterance_id"] in {m["utterance_id"] for m in stopped}, messages
        assert messages[-1]["type"] == "session.closed" and ws.close_code == 1000

    async def test_a_client_streaming_while_an_update_waits_is_not_idle(
        self, gateway: GatewayProcess
    ) -> None:
        # The second update waits for the first one's replaced engine (6 s of
        # backlog); the audio streamed meanwhile is held, and the 3 s idle
        # timeout, which only a push held back kept off, ended the session.
        ws, _ = await open_session(gateway.url, provider="FAULTY", model="backlog")
        await send_audio(ws, np.zeros(8000, np.int16))
        update = {"type": "session.update", "session": {"provider": "FAULTY", "model": "echo"}}
        await ws.send(json.dumps(update))
        await recv_type(ws, "session.updated")
        await ws.send(json.dumps(update))  # waits for the backlog to finish
        await send_audio(ws, np.zeros(16000 * 5, np.int16), realtime=1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await collect(ws, 30)
        assert not [m for m in messages if m["type"] == "error"], messages
        assert [m["type"] for m in messages].count("session.updated") == 1, messages
        assert messages[-1]["type"] == "session.closed"
        assert messages[-1]["reason"] == "client_close", messages[-1]


class TestHealth:
    def test_healthz(self, gateway: GatewayProcess) -> None:
        with urllib.request.urlopen(f"{gateway.http}/healthz", timeout=5) as r:
            body = json.loads(r.read())
        assert r.status == 200
        assert body["status"] == "ok" and body["ready"] is True
        # `auto` runs on uvloop, a dependency wherever it builds (not on Windows).
        assert body["event_loop"] == ("asyncio" if sys.platform == "win32" else "uvloop")

    async def test_runs_on_asyncio_loop_when_configured(self, shared_audio: Path) -> None:
        server = GatewayProcess("asyncio-loop", env={"TRANSCRIBE_EVENT_LOOP": "asyncio"})
        try:
            assert server.health()["event_loop"] == "asyncio"
            ws, _ = await open_session(server.url)
            await send_audio(ws, read_audio(shared_audio / "goforward.raw")[: 2 * 16000])
            await ws.send(json.dumps({"type": "session.close"}))
            messages = await collect(ws, 30)
            assert messages[-1]["type"] == "session.closed"
            assert any(m["type"] == "transcription.completed" for m in messages)
        finally:
            server.stop()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as refused:
        return refused.code


class TestShutdown:
    async def test_sigterm_drains_open_sessions_and_exits_0(self, shared_audio: Path) -> None:
        server = GatewayProcess(
            "sigterm", env={"TRANSCRIBE_IDLE_TIMEOUT_S": "60", "TRANSCRIBE_DRAIN_TIMEOUT_S": "20"}
        )
        try:
            audio = read_audio(shared_audio / "goforward.raw")[: int(2.35 * 16000)]
            clients = []
            for _ in range(3):
                ws, _ = await open_session(server.url)
                await send_audio(ws, audio)
                clients.append(ws)
            server.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*(collect(ws, 60) for ws in clients))
            for ws, messages in zip(clients, results, strict=True):
                assert normalize(finals(messages)) == "go forward ten meters"
                assert messages[-1]["type"] == "session.closed"
                assert messages[-1]["reason"] == "shutdown"
                assert ws.close_code == 1000
            assert server.proc.wait(30) == 0
        finally:
            server.stop()
        with pytest.raises(OSError):
            await websockets.connect(server.url, open_timeout=2)

    async def test_sighup_drains_and_the_probes_answer_meanwhile(self) -> None:
        # SIGHUP (a closed terminal, a kill -HUP meant as a reload) killed the
        # process at once: no session.closed, no usage. And during a drain the
        # listener was closed: the health probes were refused by TCP.
        server = GatewayProcess("sighup")
        try:
            ws, _ = await open_session(server.url, provider="FAULTY", model="count-slow-finalize")
            await send_audio(ws, np.zeros(8000, np.int16))
            await asyncio.sleep(0.2)
            server.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)  # the final comes 2 s after the end of the input
            health = await asyncio.to_thread(server.health)
            assert (health["status"], health["sessions"]) == ("draining", 1), health
            assert await asyncio.to_thread(http_status, f"{server.http}/readyz") == 503
            late = await websockets.connect(server.url)
            with pytest.raises(websockets.ConnectionClosedError):
                await asyncio.wait_for(late.recv(), 10)
            assert late.close_code == 1012
            messages = await collect(ws)
            assert [m["text"] for m in messages if m["type"] == "transcription.completed"] == [
                "8000"
            ]
            assert messages[-1]["type"] == "session.closed", messages
            assert messages[-1]["reason"] == "shutdown"
            assert server.proc.wait(30) == 0
        finally:
            server.stop()
        db = sqlite3.connect(server.store_path)
        try:
            [(seconds,)] = db.execute("SELECT audio_seconds FROM usage").fetchall()
            assert seconds == pytest.approx(0.5)
        finally:
            db.close()

    def test_a_signal_while_the_engines_start_exits_without_the_banner(self) -> None:
        # Ctrl-C while the engines loaded drained, then printed the "try this"
        # banner (the WebSocket URL, a command to run) for a server about to exit.
        ARTIFACTS.mkdir(exist_ok=True)
        log_path = ARTIFACTS / "server-slow-start.log"
        env = {
            **os.environ,
            "TRANSCRIBE_API_KEYS": TEST_KEYS[0],
            "TRANSCRIBE_LOCAL_ALLOW_DOWNLOADS": "false",
            "TRANSCRIBE_PLUGINS": "tests.plugins.slow_start:SlowStartSTT",
            "TRANSCRIBE_STORE_PATH": str(ARTIFACTS / "store-slow-start.db"),
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "transcribe_gateway", "serve", "--port", str(free_port())]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 60
            while "slow start: warming up" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert "WebSocket URL" not in log_path.read_text(errors="replace")

    async def test_a_connection_not_yet_authenticated_is_closed_1012(self) -> None:
        # It never got session.created: no session.closed either, but the close
        # a connection that came in during the drain gets. One that authenticates
        # within the linger is a session, and drains as one.
        server = GatewayProcess("sigterm-unauthenticated")
        try:
            silent = await websockets.connect(server.url)
            late = await websockets.connect(server.url)
            await asyncio.sleep(0.2)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            await late.send(json.dumps({"type": "auth", "token": TEST_KEYS[0]}))
            late_messages = await collect(late)
            with pytest.raises(websockets.ConnectionClosedError):  # before any message
                await asyncio.wait_for(silent.recv(), 10)
            assert (silent.close_code, silent.close_reason) == (1012, "server shutting down")
            assert [m["type"] for m in late_messages] == ["session.created", "session.closed"]
            assert late.close_code == 1000
            assert server.proc.wait(30) == 0
        finally:
            server.stop()

    async def test_an_engine_silent_while_finishing_is_cut_off_before_the_drain_ends(
        self,
    ) -> None:
        # The session's own bound (0.5 s of linger, then 1 s of engine silence)
        # comes first: provider_error, session.closed and 1000, as a session.close
        # gets. The drain used to end at drain_timeout_s itself: a bare 1012.
        server = GatewayProcess("sigterm-hang", env={"TRANSCRIBE_DRAIN_TIMEOUT_S": "1"})
        try:
            ws, _ = await open_session(server.url, provider="FAULTY", model="hang-on-finalize")
            await send_audio(ws, np.zeros(16000, np.int16))
            await recv(ws)  # speech.started of chunk 0: the audio is in
            server.proc.send_signal(signal.SIGTERM)
            messages = await collect(ws)
            errors = [m["error"]["code"] for m in messages if m["type"] == "error"]
            assert errors == ["provider_error"], messages
            assert messages[-1]["type"] == "session.closed", messages
            assert ws.close_code == 1000
            assert server.proc.wait(30) == 0
        finally:
            server.stop()

    async def test_sessions_the_drain_could_not_finish_still_record_their_usage(
        self,
    ) -> None:
        # An engine that never finishes and is never silent outlives the drain:
        # the exit closes it (1012). Its cleanup, closing the engine (1 s), ran
        # after the store closed, and the usage records were lost.
        server = GatewayProcess("sigterm-usage", env={"TRANSCRIBE_DRAIN_TIMEOUT_S": "1"})
        try:
            clients = []
            for _ in range(2):
                ws, _ = await open_session(server.url, provider="FAULTY", model="chatty-slow-close")
                await send_audio(ws, np.zeros(8000, np.int16))
                clients.append(ws)
            server.proc.send_signal(signal.SIGTERM)
            for ws in clients:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await collect(ws)
                assert ws.close_code == 1012
            assert server.proc.wait(30) == 0
        finally:
            server.stop()
        db = sqlite3.connect(server.store_path)
        try:
            rows = db.execute("SELECT audio_seconds FROM usage").fetchall()
        finally:
            db.close()
        assert [seconds for (seconds,) in rows] == [pytest.approx(0.5), pytest.approx(0.5)]

    async def test_an_update_still_opening_at_sigterm_is_answered(self) -> None:
        # Its engine opens in 1.5 s, after the drain began: the update was dropped
        # without a word, and the client only saw session.closed.
        server = GatewayProcess("sigterm-update")
        try:
            ws = await connect(server.url)
            assert (await recv(ws))["type"] == "session.created"
            update = {"provider": "FAULTY", "model": "count-slow-open"}
            await ws.send(json.dumps({"type": "session.update", "session": update}))
            await asyncio.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            messages = await collect(ws)
            kinds = [m["type"] for m in messages]
            assert kinds == ["error", "session.closed"], messages
            assert messages[0]["error"]["code"] == "session_closing"
            assert "shutting down" in messages[0]["error"]["message"]
            assert server.proc.wait(30) == 0
        finally:
            server.stop()

    async def test_a_second_signal_ends_the_drain_at_once_and_still_cleans_up(self) -> None:
        # The drain would wait 30 s for an engine that never finishes; a second
        # SIGTERM closes the session (1012) at once. uvicorn skipped the app's
        # shutdown then, and the cancelled lifespan logged a traceback at ERROR.
        server = GatewayProcess("sigterm-twice", env={"TRANSCRIBE_DRAIN_TIMEOUT_S": "30"})
        try:
            ws, _ = await open_session(server.url, provider="FAULTY", model="chatty-slow-close")
            await send_audio(ws, np.zeros(8000, np.int16))
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)  # past the linger: draining, the engine chattering
            server.proc.send_signal(signal.SIGTERM)
            forced = time.monotonic()
            with contextlib.suppress(websockets.ConnectionClosed):
                await collect(ws)
            assert ws.close_code == 1012
            assert server.proc.wait(30) == 0
            assert time.monotonic() - forced < 10
        finally:
            server.stop()
        logs = server.logs()
        assert "Traceback" not in logs and " ERROR " not in logs, logs
        db = sqlite3.connect(server.store_path)
        try:
            rows = db.execute("SELECT audio_seconds, close_reason FROM usage").fetchall()
        finally:
            db.close()
        assert rows == [(pytest.approx(0.5), "shutdown")], rows

    async def test_ctrl_c_drains_pocketsphinx_sessions_too(self, shared_audio: Path) -> None:
        # A terminal's Ctrl-C signals the whole process group: pocketsphinx's
        # worker processes as well as the server. The server drains; the
        # workers leave that to it (before, one interrupted mid-decode died, its
        # KeyboardInterrupt came back as the call's result and killed the server).
        server = GatewayProcess("ctrl-c", env={"TRANSCRIBE_DRAIN_TIMEOUT_S": "20"}, own_group=True)
        try:
            audio = read_audio(shared_audio / "jfk.flac")
            ws, _ = await open_session(server.url, model="pocketsphinx-en-us")
            sending = asyncio.create_task(send_audio(ws, audio, realtime=1.0))
            await asyncio.sleep(3.0)  # mid-sentence: the worker is decoding
            os.killpg(server.proc.pid, signal.SIGINT)
            messages = await collect(ws, 60)
            with contextlib.suppress(websockets.ConnectionClosed):
                await sending
            assert [m for m in messages if m["type"] == "transcription.completed"]
            assert not [
                m
                for m in messages
                if m["type"] == "error" and m["error"]["code"] != "session_closing"
            ], messages
            assert messages[-1]["type"] == "session.closed"
            assert messages[-1]["reason"] == "shutdown"
            assert ws.close_code == 1000
            assert server.proc.wait(30) == 0
        finally:
            server.stop()
