"""Two gateway replicas sharing one real redis-server."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.ops.conftest import OPS_ENV, RedisServer, create_key, run_cli
from tests.server.wsutil import connect, recv, recv_type, send_audio, silence

LEASE_TTL_S = 3.0


def redis_env(redis: RedisServer) -> dict[str, str]:
    return {
        "TRANSCRIBE_STORE_BACKEND": "redis",
        "TRANSCRIBE_REDIS_URL": redis.url,
        "TRANSCRIBE_STORE_LEASE_TTL_S": str(LEASE_TTL_S),
    }


@pytest.fixture(scope="module")
def env(redis_server: RedisServer) -> dict[str, str]:
    return redis_env(redis_server)


@pytest.fixture(scope="module")
def replicas(env: dict[str, str]) -> Iterator[list[GatewayProcess]]:
    # Replicas share the token secret, as they would behind one load balancer.
    shared = {**OPS_ENV, **env, "TRANSCRIBE_TOKEN_SECRET": "replicas-share-this-secret"}
    servers = [GatewayProcess(f"replica-{n}", env=shared) for n in "ab"]
    yield servers
    for server in servers:
        server.stop()


def mint_token(http: str, key: str) -> str:
    request = urllib.request.Request(
        f"{http}/v1/tokens", data=b"", method="POST", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        token: str = json.loads(r.read())["token"]
    return token


def http_call(method: str, url: str, key: str) -> tuple[int, str]:
    """(status, body) of a request with ``Authorization: Bearer <key>``."""
    data = b"" if method == "POST" else None
    headers = {"Authorization": f"Bearer {key}"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def outcome(url: str, key: str) -> tuple[str, Any]:
    """("created", socket) or ("closed", (code, error codes))."""
    ws = await connect(url, key)
    errors: list[str] = []
    try:
        while True:
            msg = await recv(ws, 5)
            if msg["type"] == "session.created":
                return "created", ws
            errors.append(msg["error"]["code"])
    except websockets.ConnectionClosed:
        return "closed", (ws.close_code, errors)


class TestSharedLimits:
    async def test_concurrency_limit_holds_across_replicas(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        a, b = replicas
        key = create_key(env, "shared-two", "--max-sessions", "2")
        kind1, ws1 = await outcome(a.url, key)
        kind2, ws2 = await outcome(b.url, key)
        assert (kind1, kind2) == ("created", "created")
        for replica in (a, b):
            assert await outcome(replica.url, key) == ("closed", (4029, ["too_many_sessions"]))
        await ws1.close()
        await asyncio.sleep(0.3)
        kind, ws3 = await outcome(b.url, key)
        assert kind == "created"
        await ws2.close()
        await ws3.close()

    async def test_usage_from_both_replicas_adds_up(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        key = create_key(env, "two-boxes")
        for replica, seconds in zip(replicas, (1.0, 2.0), strict=True):
            kind, ws = await outcome(replica.url, key)
            assert kind == "created"
            config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
            await ws.send(json.dumps({"type": "session.update", "session": config}))
            await recv_type(ws, "session.updated", 30)
            await send_audio(ws, silence(seconds))
            await ws.send(json.dumps({"type": "session.close"}))
            await recv_type(ws, "session.closed", 30)
        deadline = time.monotonic() + 10
        while True:
            done = run_cli(env, "usage", "--key", "two-boxes", "--period", "day", "--json")
            rows = [json.loads(line) for line in done.stdout.splitlines()]
            if (rows and rows[0]["sessions"] == 2) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert [(r["sessions"], r["audio_seconds"]) for r in rows] == [(2, 3.0)]

    async def test_audio_quota_is_shared(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        a, b = replicas
        key = create_key(env, "shared-quota", "--audio-minutes", "0.05", "--period", "day")
        kind, ws = await outcome(a.url, key)
        assert kind == "created"
        config = {"provider": "LOCAL", "model": "whisper-tiny.en"}
        await ws.send(json.dumps({"type": "session.update", "session": config}))
        await recv_type(ws, "session.updated", 30)
        await send_audio(ws, silence(3.5))
        await ws.send(json.dumps({"type": "session.close"}))
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await recv(ws, 10)
        assert ws.close_code in (1000, 4029)
        await asyncio.sleep(1.5)  # the metered audio reaches Redis on the next tick
        assert await outcome(b.url, key) == ("closed", (4029, ["quota_exceeded"]))

    async def test_message_rate_is_shared(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        key = create_key(env, "shared-rate", "--rate", "20")
        sockets = []
        for replica in replicas:
            kind, ws = await outcome(replica.url, key)
            assert kind == "created"
            sockets.append(ws)

        async def send_at(ws: Any, per_second: float, seconds: float) -> None:
            for _ in range(int(per_second * seconds)):
                await ws.send(json.dumps({"type": "audio.append", "audio": "AAAA"}))
                await asyncio.sleep(1 / per_second)

        def waits() -> float:
            from tests.ops.test_metrics import get, sample

            return sum(
                sample(get(f"{r.http}/metrics")[1], "transcribe_rate_limit_waits_total") or 0.0
                for r in replicas
            )

        before = waits()
        # 15/s on each replica: under the rate on either, 30/s together: held back.
        await asyncio.gather(*(send_at(ws, 15, 3.0) for ws in sockets))
        await asyncio.sleep(1.5)
        for ws in sockets:
            await ws.close()
        assert waits() - before >= 1

    async def test_session_token_is_single_use_across_replicas(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        a, b = replicas
        key = create_key(env, "token-owner")
        token = mint_token(a.http, key)
        kind, ws = await outcome(b.url, token)  # minted on A, spent on B
        assert kind == "created"
        await ws.close()
        for replica in (a, b):
            assert await outcome(replica.url, token) == ("closed", (4001, []))

    async def test_revocation_closes_sessions_on_every_replica(
        self, replicas: list[GatewayProcess], env: dict[str, str]
    ) -> None:
        key = create_key(env, "revoke-everywhere")
        sockets = []
        for replica in replicas:
            kind, ws = await outcome(replica.url, key)
            assert kind == "created"
            sockets.append(ws)
        assert run_cli(env, "keys", "revoke", "revoke-everywhere").returncode == 0
        start = time.monotonic()
        for ws in sockets:
            msg = await recv(ws, 10)
            assert msg["error"]["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed):
                await recv(ws, 5)
            assert ws.close_code == 4001
        assert time.monotonic() - start < 5
        for replica in replicas:
            assert await outcome(replica.url, key) == ("closed", (4001, []))


class TestReplicaDeath:
    async def test_killed_replica_frees_its_slots_after_the_lease(
        self, redis_server: RedisServer, env: dict[str, str]
    ) -> None:
        a = GatewayProcess("replica-live", env={**OPS_ENV, **env})
        b = GatewayProcess("replica-doomed", env={**OPS_ENV, **env})
        try:
            key = create_key(env, "lease-test", "--max-sessions", "2")
            held = [await outcome(b.url, key), await outcome(b.url, key)]
            assert [kind for kind, _ in held] == ["created", "created"]
            assert await outcome(a.url, key) == ("closed", (4029, ["too_many_sessions"]))
            # Held well past one lease: live sessions renew theirs.
            await asyncio.sleep(LEASE_TTL_S * 1.5)
            assert await outcome(a.url, key) == ("closed", (4029, ["too_many_sessions"]))
            b.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            assert await outcome(a.url, key) == ("closed", (4029, ["too_many_sessions"]))
            while True:
                kind, ws = await outcome(a.url, key)
                if kind == "created" or time.monotonic() - killed_at > LEASE_TTL_S + 5:
                    break
                await asyncio.sleep(0.25)
            assert kind == "created"
            assert time.monotonic() - killed_at >= LEASE_TTL_S - 1.0
            await ws.close()
        finally:
            a.stop()
            b.stop()


class TestRedisReadiness:
    def test_readyz_fails_when_redis_is_down(
        self, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        redis = RedisServer(tmp_path_factory.mktemp("redis-down"))
        server = GatewayProcess("replica-readyz", env={**OPS_ENV, **redis_env(redis)})
        try:
            with urllib.request.urlopen(f"{server.http}/readyz", timeout=10) as r:
                assert json.loads(r.read())["store"] is True
            redis.stop()
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{server.http}/readyz", timeout=10)
            assert info.value.code == 503
            body = json.loads(info.value.read())
            assert (body["ready"], body["engines"], body["store"]) == (False, True, False)
            assert server.health()["status"] == "ok"  # alive, just not ready
        finally:
            server.stop()
            redis.stop()

    def test_tokens_and_usage_answer_503_unavailable_when_redis_is_down(
        self, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        redis = RedisServer(tmp_path_factory.mktemp("redis-gone"))
        env = redis_env(redis)
        server = GatewayProcess("replica-store-down", env={**OPS_ENV, **env})
        try:
            key = create_key(env, "store-down")
            redis.stop()
            calls = [
                ("POST", "/v1/tokens", key),
                ("GET", "/v1/usage", key),
                ("GET", "/v1/usage", TEST_KEYS[0]),  # a static key: only the report fails
            ]
            for method, path, bearer in calls:
                status, text = http_call(method, f"{server.http}{path}", bearer)
                assert status == 503, (method, path, text)
                error = json.loads(text)["error"]
                assert error["code"] == "unavailable" and error["message"]
            assert "key store call failed" in server.log_path.read_text()
        finally:
            server.stop()
            redis.stop()
