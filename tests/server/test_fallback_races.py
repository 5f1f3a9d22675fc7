"""Fallback and failure paths that race the session's end, a reconfiguration or
the client: nothing accepted is lost, and every engine stream opened is closed.

The engines are the ``FAULTY`` plugin (tests/plugins/faulty.py) on a gateway of
this module's own: its streams log their opening and closing to a file, and its
drain timeout is 1 s, shorter than the 1.5 s the ``count-slow-open`` fallback
takes to open, so a switch outlasts it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ARTIFACTS, GatewayProcess
from tests.server.wsutil import collect, connect, open_session, recv, recv_type, send_audio
from transcribe_gateway.server.replay import ReplayBuffer

SLOW_FALLBACK = {"provider": "FAULTY", "model": "count-slow-open"}
ONE_SECOND = np.arange(16000, dtype=np.int16)


class Server(GatewayProcess):
    def __init__(self, log: Path) -> None:
        self.stream_log = log
        log.unlink(missing_ok=True)
        super().__init__(
            "fallback-races",
            env={"FAULTY_STREAM_LOG": str(log), "TRANSCRIBE_DRAIN_TIMEOUT_S": "1"},
        )

    def unclosed(self, timeout: float = 8.0) -> set[str]:
        """Streams opened and not closed, once none is left or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.stream_log.read_text().splitlines() if self.stream_log.exists() else []
            opened = {line.split()[1] for line in lines if line.startswith("open ")}
            closed = {line.split()[1] for line in lines if line.startswith("close ")}
            if not opened - closed or time.monotonic() > deadline:
                return opened - closed
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    ARTIFACTS.mkdir(exist_ok=True)
    gateway = Server(ARTIFACTS / "faulty-streams.log")
    yield gateway
    gateway.stop()


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "transcription.completed"]


async def test_a_close_during_the_switch_waits_for_the_fallback(server: Server) -> None:
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    await recv_type(ws, "error")  # switching: the fallback takes 1.5 s to open
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    kinds = [m["type"] for m in messages]
    # All of it, replayed into the fallback before the session closed.
    assert texts(messages) == ["16000"], messages
    assert kinds.index("session.updated") < kinds.index("transcription.completed")
    assert kinds[-1] == "session.closed"
    assert server.unclosed() == set()  # the failed stream too


async def test_the_drain_timeout_does_not_cut_a_switch_off(server: Server) -> None:
    # The primary dies 0.2 s into finalizing; its fallback opens 1.5 s later,
    # past the 1 s drain timeout, which counts the failed engine's silence.
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-on-finalize", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    assert texts(messages) == ["16000"], messages
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert len(errors) == 1 and "switching to the fallback" in errors[0]
    assert server.unclosed() == set()


async def test_a_client_gone_during_the_switch_leaves_no_stream_open(server: Server) -> None:
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    await recv_type(ws, "error")
    await ws.close()  # gone, with no session.close
    await asyncio.sleep(2.0)  # past the fallback's opening
    assert server.unclosed() == set()
    assert server.health()["sessions"] == 0


async def test_a_client_gone_while_an_update_opens_its_engine_leaves_no_stream_open(
    server: Server,
) -> None:
    # The client leaves 0.8 s into an update whose engine opens in 1.5 s, while the
    # old engine takes 1 s to close: the new engine opened during that close and
    # was installed after the session's cleanup, never to be closed (nor its tasks).
    ws, _ = await open_session(server.url, provider="FAULTY", model="chatty-slow-close")
    update = {"type": "session.update", "session": SLOW_FALLBACK}
    await ws.send(json.dumps(update))
    await asyncio.sleep(0.8)
    ws.transport.abort()  # gone: a TCP reset
    await asyncio.sleep(2.0)  # past the engine's opening
    assert server.unclosed() == set()
    assert server.health()["sessions"] == 0


async def test_a_client_gone_while_its_session_ends_the_input_leaves_no_stream_open(
    server: Server,
) -> None:
    # The session was ending its engine's input (4 s, held back) when the client
    # left: the engine was in neither the session's hands nor the drain's yet,
    # and nothing closed it (nor its tasks, nor a LOCAL slot).
    ws, _ = await open_session(server.url, provider="FAULTY", model="slow-end-input")
    await send_audio(ws, ONE_SECOND)
    for _ in range(2):  # all of it taken (a paused reader would not see the client go)
        await recv_type(ws, "transcription.completed")
    await ws.send(json.dumps({"type": "session.close"}))
    await asyncio.sleep(1.0)
    ws.transport.abort()
    await asyncio.sleep(0.5)  # the abort happens on the loop, which unclosed() blocks
    assert server.unclosed(timeout=3.0) == set()
    assert server.health()["sessions"] == 0


async def test_an_update_during_the_switch_comes_after_it(server: Server) -> None:
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    await recv_type(ws, "error")
    update = {"provider": "FAULTY", "model": "echo"}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    await send_audio(ws, ONE_SECOND)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    served = [m["session"]["model"] for m in messages if m["type"] == "session.updated"]
    # The switch ends first; the update then replaces the fallback, which
    # finishes what was replayed into it; the second second goes to echo.
    assert served == ["count-slow-open", "echo"], messages
    assert sorted(texts(messages)) == ["16000", "chunk 0", "chunk 1"]
    assert messages[-1]["type"] == "session.closed"
    assert server.unclosed() == set()


async def test_a_retired_stream_failing_does_not_take_the_new_fallback(server: Server) -> None:
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-on-finalize", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    update = {"provider": "FAULTY", "model": "echo", "fallback": SLOW_FALLBACK}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    assert (await recv_type(ws, "session.updated"))["session"]["model"] == "echo"
    # The old stream dies 0.2 s into finishing; the session stays on echo.
    error = await recv_type(ws, "error")
    assert "while finalizing" in error["error"]["message"]
    assert "switching" not in error["error"]["message"]
    await send_audio(ws, ONE_SECOND)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    assert "session.updated" not in [m["type"] for m in messages], messages
    assert texts(messages) == ["chunk 0", "chunk 1"]
    assert messages[-1]["type"] == "session.closed"
    assert server.unclosed() == set()


async def test_a_push_into_a_failed_engine_does_not_hang_the_session(server: Server) -> None:
    # The engine takes every chunk through the awaited path, holds 64, and
    # stops taking them 0.5 s in: the 4 s sent at once leave a push waiting
    # when it fails.
    ws, _ = await open_session(server.url, provider="FAULTY", model="stall-then-fail")
    await send_audio(ws, np.tile(ONE_SECOND, 4))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, timeout=15)
    assert [m["type"] for m in messages if m["type"] != "error"] == ["session.closed"]
    assert any(m["type"] == "error" for m in messages)
    assert server.unclosed() == set()


def test_replay_skips_no_chunk_while_a_full_buffer_drops_old_ones() -> None:
    buffer = ReplayBuffer(rate=1000, max_seconds=0.3)
    for i in range(3):  # full: three 100 ms chunks
        buffer.append(i * 100, np.full(100, i, np.int16))
    replayed = []
    for first, chunk in buffer.unplayed():
        assert first == chunk[0] * 100  # where it starts in the session
        replayed.append(int(chunk[0]))
        if len(replayed) < 6:  # a live chunk arrives meanwhile, dropping the oldest
            n = 2 + len(replayed)
            buffer.append(n * 100, np.full(100, n, np.int16))
    assert replayed == [0, 1, 2, 3, 4, 5, 6, 7]
    assert buffer.dropped_samples == 500


async def test_a_shutdown_while_an_update_opens_its_engine_finishes_the_old_one() -> None:
    # The update's engine takes 1.5 s to open; the shutdown's 0.5 s linger ends
    # first and the session begins to end, finishing the old engine (2 s). The
    # update comes too late to be served, and the session still ends cleanly.
    server = GatewayProcess("shutdown-update")
    try:
        ws, _ = await open_session(server.url, provider="FAULTY", model="count-slow-finalize")
        await send_audio(ws, ONE_SECOND)
        update = {"provider": "FAULTY", "model": "count-slow-open"}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        await asyncio.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        messages = await collect(ws)
        assert texts(messages) == ["16000"], messages
        assert [m["type"] for m in messages][-1] == "session.closed"
        assert ws.close_code == 1000
    finally:
        assert server.stop() == 0


async def test_a_replay_after_the_rate_changed_keeps_the_session_clock(server: Server) -> None:
    # 10 s at 8 kHz, then a configuration at 48 kHz with a fallback: the replay
    # counts its samples at 48 kHz, and its audio starts at 10 s.
    ws, _ = await open_session(server.url, provider="FAULTY", model="echo", sample_rate=8000)
    await send_audio(ws, np.zeros(80000, np.int16), rate=8000)
    update = {
        "provider": "FAULTY",
        "model": "fail-after-audio",
        "sample_rate": 48000,
        "fallback": SLOW_FALLBACK,
    }
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    await recv_type(ws, "session.updated")
    await send_audio(ws, np.zeros(48000, np.int16), rate=48000)
    await recv_type(ws, "error")
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    finals = [m for m in messages if m["type"] == "transcription.completed"]
    (replayed,) = [m for m in finals if not m["text"].startswith("chunk")]  # echo's
    assert replayed["text"] == "16000"  # all of the second second, at the engine's rate
    assert replayed["start_ms"] == 10000
    assert server.unclosed() == set()


async def test_a_switch_that_begins_while_an_update_opens_comes_before_it(
    server: Server,
) -> None:
    # The update's engine takes 1.5 s to open; meanwhile the primary fails (0.5 s
    # in, after a 0.5 s stall) and the switch opens its fallback (1.5 s too). The
    # update applies after the switch, and replaces the fallback.
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="stall-then-fail", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, ONE_SECOND)
    update = {"provider": "FAULTY", "model": "count-slow-open"}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    updated = [m["session"] for m in messages if m["type"] == "session.updated"]
    assert len(updated) == 2, messages
    assert updated[0].get("requested_model") == "stall-then-fail"  # the fallback's
    assert "requested_model" not in updated[1]  # then the update's, serving to the end
    assert "16000" in texts(messages)  # the replayed second, from the fallback
    assert server.unclosed() == set()


def counters(server: GatewayProcess) -> tuple[float, float]:
    """FAULTY's provider errors and FAULTY -> FAULTY switches so far (/metrics)."""
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as r:
        text = r.read().decode()

    def value(pattern: str) -> float:
        found = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    errors = value(r'transcribe_provider_errors_total\{provider="FAULTY"\}')
    switches = value(r'transcribe_fallbacks_total\{from_provider="FAULTY",to_provider="FAULTY"\}')
    return errors, switches


async def test_a_failure_to_open_is_counted_as_one_mid_stream_is(server: Server) -> None:
    # operations.md: provider failures seen by sessions, and switches to the
    # fallback. A provider refusing at configuration time was counted in neither.
    errors, switches = counters(server)
    refusing = {"provider": "FAULTY", "model": "refuse-on-open"}
    for fallback, answer in (
        ({"provider": "FAULTY", "model": "echo"}, "session.updated"),
        (None, "error"),
    ):
        ws = await connect(server.url)
        await recv(ws)
        session = {**refusing, "fallback": fallback} if fallback else refusing
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        assert (await recv(ws))["error"]["code"] == "provider_error"
        if answer == "session.updated":
            assert (await recv(ws))["session"]["model"] == "echo"
        await ws.close()
    assert counters(server) == (errors + 2, switches + 1)


def closed_usage(messages: list[dict[str, Any]]) -> float:
    assert messages[-1]["type"] == "session.closed", messages
    return float(messages[-1]["usage"]["audio_seconds"])


async def test_a_fallback_that_fails_during_its_replay_serves_no_more(server: Server) -> None:
    # It failed while the replay waited on it, and was then installed anyway: the
    # live audio after was billed and dropped without a word (no
    # session_not_configured). Its session.updated comes before its failure.
    errors, switches = counters(server)
    fallback = {"provider": "FAULTY", "model": "fail-after-audio"}
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-3s", fallback=fallback
    )
    await send_audio(ws, np.ones(16000 * 3, np.int16))  # the primary fails on its last chunk
    await asyncio.sleep(1.0)
    await send_audio(ws, np.ones(16000 * 2, np.int16), realtime=4.0)  # no engine takes this
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    told = [m["type"] for m in messages if m["type"] in ("error", "session.updated")]
    assert told[:3] == ["error", "session.updated", "error"], messages
    codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
    assert codes[:2] == ["provider_error", "provider_error"], messages
    assert "session_not_configured" in codes
    assert closed_usage(messages) <= 3.0 + 1e-6  # what the primary took, not the 2 s after
    assert counters(server) == (errors + 2, switches)  # no switch was made
    assert server.unclosed() == set()


async def test_a_fallback_whose_open_raises_is_a_provider_error(server: Server) -> None:
    # A bug in the fallback's open_stream ended the pump task ("Task exception
    # was never retrieved"): no error for it, and the failed engine's open
    # utterance got neither its final nor its speech.stopped.
    fallback = {"provider": "FAULTY", "model": "crash-on-open"}
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="um-then-fail", fallback=fallback
    )
    await send_audio(ws, ONE_SECOND, realtime=2.0)
    await asyncio.sleep(0.5)  # it fails 0.3 s after its utterances
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    errors = [m["error"]["message"] for m in messages if m["type"] == "error"]
    assert "switching to the fallback FAULTY/crash-on-open" in errors[0], errors
    assert "internal engine error" in errors[1] and "bug in the engine" in errors[1], errors
    events = by_utterance(messages)
    assert all(kinds[-1] == "speech.stopped" for kinds in events.values()), events
    assert texts(messages) == ["hello wor"]  # the partial shown, kept as its final
    assert messages[-1]["type"] == "session.closed"
    assert "never retrieved" not in server.logs()


async def test_audio_a_fallback_took_before_failing_in_its_replay_is_billed(
    server: Server,
) -> None:
    # The client sends at twice the pace the fallback takes audio: the switch
    # lasts until the fallback fails, having taken 2 s (the primary's 0.5 s and
    # 1.5 s sent during the switch), and finalized them. All 4 s were billed as
    # they came, though most was dropped; then none of the switch's was; then
    # also the 500 ms chunk it refused as it failed.
    fallback = {"provider": "FAULTY", "model": "realtime-fail-after-2s"}
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=fallback
    )
    await send_audio(ws, np.ones(16000 * 4, np.int16), realtime=2.0, chunk_ms=500)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    assert texts(messages) == ["chunk 0", "chunk 1", "chunk 2"]  # transcribed, then it failed
    assert closed_usage(messages) == pytest.approx(2.0)


async def test_audio_sent_while_the_fallback_opens_is_billed(server: Server) -> None:
    # The fallback takes 1.5 s to open: the audio that came meanwhile was
    # replayed into it and transcribed, but billed by no one.
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=SLOW_FALLBACK
    )
    await send_audio(ws, np.ones(16000 * 3, np.int16), realtime=1.0)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    (given,) = texts(messages)  # the samples the fallback was given
    assert closed_usage(messages) == pytest.approx(int(given) / 16000)
    assert int(given) >= 2 * 16000  # the replay, and what came during and after the opening


async def test_audio_a_fallback_took_is_billed_when_the_client_leaves_mid_switch(
    server: Server,
) -> None:
    # The client leaves while the fallback (taking audio in real time) is still
    # replaying: the audio it took is the session's usage. None of what came
    # during the switch was billed.
    ws = await connect(server.url)
    session_id = (await recv(ws))["session"]["id"]
    fallback = {"provider": "FAULTY", "model": "count-realtime"}
    update = {"provider": "FAULTY", "model": "fail-after-audio", "fallback": fallback}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    assert (await recv(ws))["type"] == "session.updated"
    await send_audio(ws, np.ones(16000 * 4, np.int16), realtime=4.0)  # 1 s
    await asyncio.sleep(1.0)  # the fallback has taken about 2 s of the 4
    ws.transport.abort()
    assert await asyncio.to_thread(server.unclosed) == set()  # the session is over
    usage = await asyncio.to_thread(usage_of, server, session_id)
    assert usage is not None and 1.0 < usage < 3.5, usage


def usage_of(server: Server, session_id: str, timeout: float = 5.0) -> float | None:
    """The session's usage record's audio seconds (the store), once written."""
    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(server.store_path)
        try:
            query = "SELECT audio_seconds FROM usage WHERE session_id = ?"
            row = db.execute(query, (session_id,)).fetchone()
        finally:
            db.close()
        if row is not None or time.monotonic() > deadline:
            return None if row is None else float(row[0])
        time.sleep(0.1)


async def test_audio_during_a_switch_that_fails_is_not_billed(server: Server) -> None:
    # The fallback took 1.5 s to fail to open: the audio that came meanwhile
    # was dropped but counted in usage and quota, and the switch as a fallback.
    errors, switches = counters(server)
    fallback = {"provider": "FAULTY", "model": "refuse-slow-open"}
    ws, _ = await open_session(
        server.url, provider="FAULTY", model="fail-after-audio", fallback=fallback
    )
    await send_audio(ws, np.ones(16000 * 3, np.int16), realtime=1.0)  # fails at 0.5 s
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 30)
    codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
    assert codes[:2] == ["provider_error", "provider_error"], messages
    assert closed_usage(messages) < 1.0  # the 0.5 s the primary took, and its last chunks
    assert counters(server) == (errors + 2, switches)


async def test_a_switch_the_session_s_end_overtook_is_not_counted() -> None:
    # The primary refused at configuration; the session timed out idle while
    # its fallback opened (1.5 s), so the update was refused (session_closing):
    # no switch was made, though the counter of switches counted one.
    server = GatewayProcess("unmade-switch", env={"TRANSCRIBE_IDLE_TIMEOUT_S": "1"})
    try:
        ws = await connect(server.url)
        await recv(ws)
        update = {"provider": "FAULTY", "model": "refuse-on-open", "fallback": SLOW_FALLBACK}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        messages = await collect(ws)
        codes = [m["error"]["code"] for m in messages if m["type"] == "error"]
        assert codes == ["provider_error", "session_closing"], messages
        assert messages[-1]["reason"] == "idle_timeout"
        assert counters(server) == (1, 0)
    finally:
        server.stop()


async def test_an_engine_whose_close_raises_does_not_keep_the_session_open(
    server: Server,
) -> None:
    # A plugin's close raising propagated through the ending task: session.close
    # was never answered (the client waited for the idle timeout, and then some).
    ws, _ = await open_session(server.url, provider="FAULTY", model="raise-on-close")
    await send_audio(ws, ONE_SECOND)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 10)
    assert texts(messages) == ["chunk 0", "chunk 1"]
    assert messages[-1]["type"] == "session.closed"
    assert ws.close_code == 1000
    assert server.unclosed() == set()


def by_utterance(messages: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each utterance's event types, in order."""
    out: dict[str, list[str]] = {}
    for message in messages:
        if "utterance_id" in message:
            out.setdefault(message["utterance_id"], []).append(message["type"])
    return out


@pytest.mark.parametrize("model", ["um-then-fail", "um-then-hang"])
async def test_an_engine_that_fails_or_is_cut_off_leaves_no_utterance_open(
    server: Server, model: str
) -> None:
    # utt_1 stopped with nothing final; utt_2 is open with a partial when the
    # engine fails (or stops answering at the end, and the drain cuts it off).
    # utt_1 got a second speech.stopped and a completed after it; a cut-off
    # utt_2 got its partial as its final after the error, not before.
    ws, _ = await open_session(server.url, provider="FAULTY", model=model)
    await send_audio(ws, ONE_SECOND)
    await asyncio.sleep(1.0)  # the script ran (and the failure came)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws)
    assert by_utterance(messages) == {
        "utt_1": ["speech.started", "transcription.partial", "speech.stopped"],
        "utt_2": [
            "speech.started",
            "transcription.partial",
            "transcription.completed",
            "speech.stopped",
        ],
    }, messages
    kinds = [m["type"] for m in messages]
    assert kinds.index("transcription.completed") < kinds.index("error"), kinds
    finals = [m["text"] for m in messages if m["type"] == "transcription.completed"]
    assert finals == ["hello wor"]


async def test_a_retired_engines_late_stop_keeps_its_utterance_id(server: Server) -> None:
    # The old engine's stop comes 0.5 s after its input ended, while the new
    # engine ends utterances of its own: the stop got a new id and the old
    # utterance was never stopped.
    ws, _ = await open_session(server.url, provider="FAULTY", model="late-stop")
    await send_audio(ws, ONE_SECOND)
    await recv_type(ws, "transcription.completed")  # utt_1 "late", not stopped yet
    update = {"provider": "FAULTY", "model": "echo"}
    await ws.send(json.dumps({"type": "session.update", "session": update}))
    await send_audio(ws, ONE_SECOND)
    await asyncio.sleep(1.0)
    await ws.send(json.dumps({"type": "session.close"}))
    utterances = by_utterance(await collect(ws))
    assert utterances.pop("utt_1") == ["speech.stopped"], utterances
    assert list(utterances) == ["utt_2", "utt_3"], utterances  # echo's two
    for kinds in utterances.values():
        assert kinds == ["speech.started", "transcription.completed", "speech.stopped"]


async def test_repeated_updates_hold_one_replaced_stream_at_a_time(server: Server) -> None:
    # Each update replaced the engine at once and let the old one finish in the
    # background: a client repeating session.update held any number of engine
    # streams (or cloud connections) at once, past its key's session limit.
    start = len(server.stream_log.read_text().splitlines()) if server.stream_log.exists() else 0
    ws, _ = await open_session(server.url, provider="FAULTY", model="revising")
    update = {"type": "session.update", "session": {"provider": "FAULTY", "model": "revising"}}
    for _ in range(5):
        await send_audio(ws, ONE_SECOND[:1600])
        await ws.send(json.dumps(update))
    for _ in range(5):
        await recv_type(ws, "session.updated", 30)
    await ws.send(json.dumps({"type": "session.close"}))
    await collect(ws, 60)
    assert server.unclosed() == set()
    live = most = 0
    for line in server.stream_log.read_text().splitlines()[start:]:
        live += 1 if line.startswith("open ") else -1
        most = max(most, live)
    assert most <= 2, most  # the engine serving, and the one it replaced finishing
