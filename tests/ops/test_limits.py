"""Per-key limits: concurrent sessions, audio minutes per period, message rate."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from typing import Any

import pytest
import websockets

from tests.conftest import GatewayProcess
from tests.ops.conftest import create_key
from tests.server.wsutil import connect, open_session, recv, recv_type, send_audio, silence

CHUNK = json.dumps(
    {"type": "audio.append", "audio": base64.b64encode(bytes(640)).decode()}
)  # 20 ms of pcm16 silence


def counter(server: GatewayProcess, name: str, labels: str) -> float:
    """One sample of ``/metrics``, e.g. ``transcribe_refusals_total``, ``code="..."``."""
    return server.metric(f"{name}{{{labels}}}") or 0.0


def quota_refusals(server: GatewayProcess) -> float:
    return counter(server, "transcribe_refusals_total", 'code="quota_exceeded"')


async def ended_as(server: GatewayProcess, reason: str, before: float) -> bool:
    """Whether ``transcribe_sessions_total{reason=...}`` went past ``before`` (within 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(
            counter, server, "transcribe_sessions_total", f'reason="{reason}"'
        )
        if now > before:
            return True
        await asyncio.sleep(0.05)
    return False


async def _drain_until_closed(ws: Any, timeout: float = 10) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            got.append(await recv(ws, timeout))
    return got


async def _configure(ws: Any) -> None:
    assert (await recv(ws, 5))["type"] == "session.created"
    config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    assert (await recv_type(ws, "session.updated", 30))["type"] == "session.updated"


class TestConcurrentSessions:
    async def test_over_the_key_limit_gets_error_then_4029(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "two-at-a-time", "--max-sessions", "2")
        first = await connect(store_gateway.url, key)
        second = await connect(store_gateway.url, key)
        for ws in (first, second):
            assert (await recv(ws, 5))["type"] == "session.created"
        ended = counter(store_gateway, "transcribe_sessions_total", 'reason="too_many_sessions"')
        third = await connect(store_gateway.url, key)
        got = await _drain_until_closed(third)
        assert [m["error"]["code"] for m in got] == ["too_many_sessions"]
        assert third.close_code == 4029
        # Counted under its refusal's code (it was "over_limit", as any 4029).
        assert await ended_as(store_gateway, "too_many_sessions", ended)
        # A freed slot is usable again.
        await first.close()
        deadline = time.monotonic() + 5
        while True:
            again = await connect(store_gateway.url, key)
            msg = await recv(again, 5)
            if msg["type"] == "session.created" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert msg["type"] == "session.created"
        await again.close()
        await second.close()


class TestAudioQuota:
    async def test_session_over_the_audio_minutes_is_closed_and_new_ones_refused(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # 0.05 minutes = 3 s of audio per day.
        key = create_key(sqlite_env, "three-seconds", "--audio-minutes", "0.05", "--period", "day")
        refused = quota_refusals(store_gateway)
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        await send_audio(ws, silence(2.0))  # under the quota: accepted
        with pytest.raises(websockets.ConnectionClosed):
            await send_audio(ws, silence(3.0), realtime=4.0)
            await asyncio.sleep(5)  # the close may come while we wait
        got = await _drain_until_closed(ws)
        errors = [m["error"]["code"] for m in got if m["type"] == "error"]
        assert errors == ["quota_exceeded"]
        assert ws.close_code == 4029
        # The period's minutes are used up: a new session is refused at once.
        ended = counter(store_gateway, "transcribe_sessions_total", 'reason="quota_exceeded"')
        again = await connect(store_gateway.url, key)
        got = await _drain_until_closed(again)
        assert [m["error"]["code"] for m in got] == ["quota_exceeded"]
        assert again.close_code == 4029
        assert await ended_as(store_gateway, "quota_exceeded", ended)  # as the one it ended
        # Both are refusals by a limit: the session ended by it (uncounted before)
        # and the one refused at auth.
        assert quota_refusals(store_gateway) == refused + 2

    async def test_session_under_the_quota_ends_normally(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "plenty", "--audio-minutes", "10")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        await send_audio(ws, silence(2.0))
        await ws.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(ws, "session.closed", 30)
        assert closed["usage"]["audio_seconds"] == pytest.approx(2.0)

    async def test_a_key_s_exact_allowance_is_not_over_it(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # 150 chunks of 20 ms add up to 3.000000000000002 s in floating point:
        # over a 3 s quota, so the session was cut off (4029) before its last final.
        key = create_key(sqlite_env, "exactly-three", "--audio-minutes", "0.05", "--period", "day")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        await send_audio(ws, silence(3.0))
        await ws.send(json.dumps({"type": "session.close"}))
        got = await _drain_until_closed(ws, 30)
        assert [m for m in got if m["type"] == "error"] == [], got
        assert got[-1]["type"] == "session.closed"
        assert got[-1]["usage"]["audio_seconds"] == pytest.approx(3.0)

    async def test_the_chunk_that_would_cross_the_quota_uses_the_key_up(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # The session ends at the quota with its pending audio unfinalized: the
        # chunk that crossed it was never given to the engine, yet it was billed
        # whole (1 s past the quota). Now the key is metered up to its limit, no
        # more, and used up: its next session is refused at once.
        key = create_key(sqlite_env, "cross-three", "--audio-minutes", "0.05", "--period", "day")
        ws = await connect(store_gateway.url, key)
        session_id = (await recv(ws, 5))["session"]["id"]
        config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        await send_audio(ws, silence(2.9))
        await send_audio(ws, silence(1.0), chunk_ms=1000)  # 1 s in one chunk: over 3 s
        got = await _drain_until_closed(ws, 30)
        assert [m["error"]["code"] for m in got if m["type"] == "error"] == ["quota_exceeded"]
        assert ws.close_code == 4029
        db = sqlite3.connect(sqlite_env["TRANSCRIBE_STORE_PATH"])
        try:
            deadline = time.monotonic() + 5
            while (row := db.execute(USAGE_OF, (session_id,)).fetchone()) is None:
                assert time.monotonic() < deadline, "no usage record"
                await asyncio.sleep(0.1)
        finally:
            db.close()
        assert row[0] == pytest.approx(3.0)
        again = await connect(store_gateway.url, key)
        got = await _drain_until_closed(again)
        assert [m["error"]["code"] for m in got] == ["quota_exceeded"]

    async def test_the_quota_leaves_no_utterance_open(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # The engine's utterance was open ("hello wor") when the quota ended the
        # session: its speech.started never got a speech.stopped.
        key = create_key(sqlite_env, "open-three", "--audio-minutes", "0.05", "--period", "day")
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        config = {"provider": "FAULTY", "model": "um-then-hang"}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        await send_audio(ws, silence(1.0))
        await recv_type(ws, "transcription.partial", 10)  # the open utterance
        await send_audio(ws, silence(3.0), chunk_ms=1000)  # over the 3 s
        got = await _drain_until_closed(ws, 30)
        assert ws.close_code == 4029
        kinds = [m["type"] for m in got]
        assert kinds[-2:] == ["speech.stopped", "error"], kinds


USAGE_OF = "SELECT audio_seconds FROM usage WHERE session_id = ?"


class TestMessageRate:
    async def test_a_key_s_sessions_share_its_rate(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # One session uploading fast took the key's whole rate each second (it
        # woke first and went through its held messages without a pause): a
        # live call on the same key got nothing through until the upload ended.
        key = create_key(sqlite_env, "shared-10", "--rate", "10")
        upload, call = await connect(store_gateway.url, key), await connect(store_gateway.url, key)
        for ws in (upload, call):
            assert (await recv(ws, 5))["type"] == "session.created"
            echo = {"provider": "FAULTY", "model": "echo"}
            await ws.send(json.dumps({"type": "session.update", "session": echo}))
            await recv_type(ws, "session.updated", 10)
        for _ in range(150):  # 15 s of messages at the key's rate
            await upload.send(CHUNK)
        start = time.monotonic()
        for _ in range(4):  # 2 a second, well under its share
            await send_audio(call, silence(0.5), chunk_ms=500)
            await asyncio.sleep(0.5)
        await call.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(call, "session.closed", 30)
        took = time.monotonic() - start
        assert closed["usage"]["audio_seconds"] == pytest.approx(2.0)
        assert took < 8, took  # not behind the upload's 15 s
        await upload.close()

    async def test_messages_after_session_close_do_not_hold_it_at_the_rate(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # Chunks already in flight after session.close are only refused
        # (session_closing), but each waited for its turn at the key's rate:
        # 100 of them held session.closed back 17 s at 5 a second.
        key = create_key(sqlite_env, "rate-5", "--rate", "5")
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        echo = {"provider": "FAULTY", "model": "echo"}
        await ws.send(json.dumps({"type": "session.update", "session": echo}))
        await recv_type(ws, "session.updated", 10)
        await asyncio.sleep(1.1)  # a fresh second
        start = time.monotonic()
        await ws.send(json.dumps({"type": "session.close"}))
        for _ in range(100):
            await ws.send(CHUNK)
        got = await _drain_until_closed(ws, 30)
        took = time.monotonic() - start
        assert got[-1]["type"] == "session.closed", got
        assert took < 5, took

    async def test_a_flood_is_slowed_to_the_rate_and_nothing_is_lost(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # Over the rate, messages were dropped unread (audio lost, a session.close
        # too): a file sent fast with a rate-limited key lost most of it. They now
        # wait for the next second, the socket unread meanwhile (backpressure).
        from tests.ops.test_metrics import get, sample

        key = create_key(sqlite_env, "rate-20", "--rate", "20")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        _, text = get(f"{store_gateway.http}/metrics")
        waits_before = sample(text, "transcribe_rate_limit_waits_total") or 0.0
        start = time.monotonic()
        for _ in range(100):  # at once: 5 s of messages at the key's rate
            await ws.send(CHUNK)
        await ws.send(json.dumps({"type": "session.close"}))
        # Another session is served meanwhile.
        other, _ = await open_session(store_gateway.url)
        await send_audio(other, silence(1.0))
        await other.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(other, "session.closed", 30)
        assert closed["usage"]["audio_seconds"] == pytest.approx(1.0)
        messages = await _drain_until_closed(ws, 30)
        took = time.monotonic() - start
        assert [m for m in messages if m["type"] == "error"] == [], messages
        assert messages[-1]["type"] == "session.closed"
        assert messages[-1]["usage"]["audio_seconds"] == pytest.approx(2.0)  # all 100
        assert took >= 3.5, took  # 20 a second, not all at once
        _, text = get(f"{store_gateway.http}/metrics")
        assert (sample(text, "transcribe_rate_limit_waits_total") or 0.0) - waits_before >= 3

    async def test_messages_an_engine_held_back_are_not_lost_when_they_come_at_once(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # 50 messages a second under a rate of 60. The engine holds one push for
        # 1.5 s; what the client sent meanwhile waited in the server and the
        # socket, then came in a burst over the rate, and was dropped.
        key = create_key(sqlite_env, "rate-60", "--rate", "60")
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        config = {"provider": "FAULTY", "model": "count-hiccup"}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        await asyncio.sleep(1.1)  # a second of its own for the audio
        await send_audio(ws, silence(5.0), realtime=1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        messages = await _drain_until_closed(ws, 30)
        errors = [m["error"]["code"] for m in messages if m["type"] == "error"]
        assert errors == [], errors
        final = next(m for m in messages if m["type"] == "transcription.completed")
        assert final["text"] == str(5 * 16000)  # every sample reached the engine
