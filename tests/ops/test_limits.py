"""Per-key limits: concurrent sessions, audio minutes per period, message rate."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import urllib.request
from typing import Any

import pytest
import websockets

from tests.conftest import GatewayProcess
from tests.ops.conftest import create_key
from tests.server.wsutil import connect, open_session, recv, recv_type, send_audio, silence

CHUNK = json.dumps(
    {"type": "audio.append", "audio": base64.b64encode(bytes(640)).decode()}
)  # 20 ms of pcm16 silence


def quota_refusals(server: GatewayProcess) -> float:
    """``transcribe_refusals_total{code="quota_exceeded"}`` on ``/metrics``."""
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(r'^transcribe_refusals_total\{code="quota_exceeded"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


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
        third = await connect(store_gateway.url, key)
        got = await _drain_until_closed(third)
        assert [m["error"]["code"] for m in got] == ["too_many_sessions"]
        assert third.close_code == 4029
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
        again = await connect(store_gateway.url, key)
        got = await _drain_until_closed(again)
        assert [m["error"]["code"] for m in got] == ["quota_exceeded"]
        assert again.close_code == 4029
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


class TestMessageRate:
    async def test_flood_gets_rate_limited_and_the_server_serves_another_session(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "rate-20", "--rate", "20")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        start = time.monotonic()
        for _ in range(150):  # ~7x the rate for about a second
            await ws.send(CHUNK)
            await asyncio.sleep(0.007)
        elapsed = time.monotonic() - start
        errors: list[dict[str, Any]] = []
        with pytest.raises(TimeoutError):
            while True:
                msg = await recv(ws, 1.0)
                if msg["type"] == "error":
                    errors.append(msg["error"])
        assert errors and {e["code"] for e in errors} == {"rate_limited"}
        assert all(e["retryable"] for e in errors)
        # Throttled: at most one such error per second.
        assert len(errors) <= int(elapsed) + 2
        # Another session is served meanwhile and afterwards, and the flooded one goes on.
        other, _ = await open_session(store_gateway.url)
        await send_audio(other, silence(1.0))
        await other.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(other, "session.closed", 30)
        assert closed["usage"]["audio_seconds"] == pytest.approx(1.0)
        await ws.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(ws, "session.closed", 30)
        # Only what was under the rate was accepted (20/s, 20 ms each).
        assert 0.2 <= closed["usage"]["audio_seconds"] <= 0.4 * (elapsed + 1)

    async def test_messages_an_engine_held_back_are_not_refused_when_they_come_at_once(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # 50 messages a second under a rate of 60. The engine holds one push for
        # 1.5 s; what the client sent meanwhile waited in the server and the
        # socket, then came in a burst, and was refused as over the rate.
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

    async def test_sustained_flood_far_over_the_rate_is_closed_1008(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "rate-5", "--rate", "5")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        deadline = time.monotonic() + 15
        with pytest.raises(websockets.ConnectionClosed):
            while time.monotonic() < deadline:
                await ws.send(CHUNK)  # ~150/s: 30x the rate
                await asyncio.sleep(0.005)
        assert ws.close_code == 1008
        assert time.monotonic() < deadline - 8  # within about 3-5 s

    async def test_every_refused_message_is_counted_in_the_refusals_metric(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # transcribe_refusals_total{code="rate_limited"}: the messages refused, not the
        # errors that tell the client (one a second at most).
        from tests.ops.test_metrics import get, sample

        key = create_key(sqlite_env, "rate-5-counted", "--rate", "5")
        ws = await connect(store_gateway.url, key)
        await _configure(ws)
        await asyncio.sleep(1.1)  # a fresh second for the burst
        _, text = get(f"{store_gateway.http}/metrics")
        before = sample(text, "transcribe_refusals_total", 'code="rate_limited"') or 0.0
        sent = 40  # within a second or so: far fewer than 10x the rate a second for 3 s
        for _ in range(sent):
            await ws.send(CHUNK)
        errors = []
        with pytest.raises(TimeoutError):
            while True:
                msg = await recv(ws, 1.5)
                if msg["type"] == "error":
                    errors.append(msg)
        await ws.send(json.dumps({"type": "session.close"}))
        closed = await recv_type(ws, "session.closed", 30)
        await ws.close()
        accepted = round(closed["usage"]["audio_seconds"] / 0.02)
        _, text = get(f"{store_gateway.http}/metrics")
        after = sample(text, "transcribe_refusals_total", 'code="rate_limited"') or 0.0
        assert 1 <= len(errors) <= 2
        assert sent - accepted >= 25
        assert after - before == sent - accepted
