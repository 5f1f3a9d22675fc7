"""Usage metering: one record per session, the ``usage`` command and ``GET /v1/usage``."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.ops.conftest import create_key, run_cli
from tests.server.wsutil import connect, recv, recv_type, send_audio, silence
from transcribe_gateway.server.auth import fingerprint
from transcribe_gateway.store.usage import period_id


def http_get(url: str, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def stream_seconds(url: str, key: str, seconds: float) -> None:
    ws = await connect(url, key)
    assert (await recv(ws, 5))["type"] == "session.created"
    config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
    await ws.send(json.dumps({"type": "session.update", "session": config}))
    await recv_type(ws, "session.updated", 30)
    await send_audio(ws, silence(seconds))
    await ws.send(json.dumps({"type": "session.close"}))
    await recv_type(ws, "session.closed", 30)
    await ws.close()


def wait_usage(env: dict[str, str], name: str, sessions: int) -> list[dict[str, Any]]:
    """The usage record is written as the session ends, just after the client is closed."""
    deadline = time.monotonic() + 10
    while True:
        done = run_cli(env, "usage", "--key", name, "--period", "day", "--json")
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        if (rows and rows[0]["sessions"] >= sessions) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


class TestUsage:
    async def test_cli_reports_sessions_and_audio_per_key_and_period(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "metered")
        await stream_seconds(store_gateway.url, key, 1.5)
        await stream_seconds(store_gateway.url, key, 2.0)
        rows = wait_usage(sqlite_env, "metered", 2)
        assert len(rows) == 1
        assert rows[0]["key_name"] == "metered"
        assert rows[0]["period"] == period_id("day")
        assert rows[0]["sessions"] == 2
        assert rows[0]["audio_seconds"] == pytest.approx(3.5)
        month = run_cli(sqlite_env, "usage", "--key", "metered", "--json")
        assert json.loads(month.stdout.splitlines()[0])["period"] == period_id("month")
        table = run_cli(sqlite_env, "usage")
        assert "metered" in table.stdout and "0.06" in table.stdout  # 3.5 s = 0.06 min

    async def test_records_carry_provider_model_times_and_close_reason(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        import sqlite3

        key = create_key(sqlite_env, "detailed")
        await stream_seconds(store_gateway.url, key, 1.0)
        wait_usage(sqlite_env, "detailed", 1)
        db = sqlite3.connect(sqlite_env["TRANSCRIBE_STORE_PATH"])
        row = db.execute(
            "SELECT provider, model, audio_seconds, started_at, ended_at, close_reason "
            "FROM usage WHERE key_name = 'detailed'"
        ).fetchone()
        db.close()
        provider, model, seconds, started, ended, reason = row
        assert (provider, model, reason) == ("LOCAL", "whisper-tiny.en", "client_close")
        assert seconds == pytest.approx(1.0)
        assert 0 < ended - started < 60

    async def test_http_endpoint_returns_the_key_owners_usage(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "owner")
        other = create_key(sqlite_env, "someone-else")
        await stream_seconds(store_gateway.url, key, 1.0)
        await stream_seconds(store_gateway.url, other, 2.0)
        wait_usage(sqlite_env, "someone-else", 1)
        status, body = http_get(f"{store_gateway.http}/v1/usage?period=day", key)
        assert status == 200
        assert body["key"] == "owner"
        assert [(u["sessions"], u["audio_seconds"]) for u in body["usage"]] == [(1, 1.0)]
        assert body["usage"][0]["period"] == period_id("day")

    async def test_http_endpoint_for_a_static_key(self, store_gateway: GatewayProcess) -> None:
        await stream_seconds(store_gateway.url, TEST_KEYS[1], 1.0)
        await asyncio.sleep(0.5)
        status, body = http_get(f"{store_gateway.http}/v1/usage", TEST_KEYS[1])
        assert status == 200
        assert body["key"] == f"static:{fingerprint(TEST_KEYS[1])}"
        assert body["usage"][0]["sessions"] >= 1

    async def test_cli_reports_a_static_key_by_the_name_the_report_shows(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # The report names a static key static:<fingerprint> (operations.md); --key
        # takes that name, and the id (static-<fingerprint>) the logs use.
        await stream_seconds(store_gateway.url, TEST_KEYS[1], 1.0)
        fp = fingerprint(TEST_KEYS[1])
        by_name = wait_usage(sqlite_env, f"static:{fp}", 1)
        assert by_name and {r["key_name"] for r in by_name} == {f"static:{fp}"}
        assert wait_usage(sqlite_env, f"static-{fp}", 1) == by_name
        table = run_cli(sqlite_env, "usage", "--key", f"static:{fp}")
        assert table.returncode == 0 and f"static:{fp}" in table.stdout

    def test_cli_says_so_for_an_unknown_key(self, sqlite_env: dict[str, str]) -> None:
        for key in ("nobody", "static:00000000", "key_000000000000"):
            done = run_cli(sqlite_env, "usage", "--key", key)
            assert done.returncode == 1, done.stdout
            assert f"no key {key!r}" in done.stderr
            assert done.stdout == ""

    def test_http_endpoint_refuses_without_a_valid_key(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        assert http_get(f"{store_gateway.http}/v1/usage")[0] == 401
        status, body = http_get(f"{store_gateway.http}/v1/usage", "tgk_not-a-key")
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        key = create_key(sqlite_env, "stream-only", "--scope", "transcribe")
        assert http_get(f"{store_gateway.http}/v1/usage", key)[0] == 403
        status, body = http_get(f"{store_gateway.http}/v1/usage?period=year", TEST_KEYS[0])
        assert (status, body["error"]["code"]) == (400, "invalid_value")


class TestStoreStall:
    async def test_a_record_survives_the_store_locked_longer_than_a_timeout(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # Another process (a `keys` command, a backup) holds the write lock for 12 s
        # while a session ends: past SQLite's 5 s busy timeout twice over. The record
        # is billing data: it is written once the lock is gone, and once only, and the
        # key's quota counts the session's audio once.
        import sqlite3

        import websockets

        key = create_key(sqlite_env, "stalled", "--audio-minutes", "0.05", "--period", "day")
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        await send_audio(ws, silence(2.0))
        lock = sqlite3.connect(sqlite_env["TRANSCRIBE_STORE_PATH"], isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            await ws.send(json.dumps({"type": "session.close"}))
            await recv_type(ws, "session.closed", 30)
            await ws.close()
            await asyncio.sleep(12)
            lock.execute("ROLLBACK")
        finally:
            lock.close()
        rows = wait_usage(sqlite_env, "stalled", 1)
        assert [(r["sessions"], r["audio_seconds"]) for r in rows] == [(1, 2.0)]
        assert "usage not recorded" not in store_gateway.logs()
        # The quota (3 s a day) holds the 2 s once: a new session is let in (not twice:
        # 4 s would refuse it) and closed as its audio crosses 3 s (not never).
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        with pytest.raises(websockets.ConnectionClosed):
            await send_audio(ws, silence(2.0), realtime=4.0)
            while True:
                await recv(ws, 10)
        assert ws.close_code == 4029
