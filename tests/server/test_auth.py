"""Authentication (PROTOCOL.md "Connection and authentication")."""

from __future__ import annotations

import json
import re
import time

import pytest
import websockets

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.server.wsutil import connect, open_session, recv

SESSION_ID = re.compile(r"^ts_[0-9a-f]{12}$")


class TestHeaderAuth:
    async def test_server_sends_session_created_after_upgrade(
        self, gateway: GatewayProcess
    ) -> None:
        async with await connect(gateway.url) as ws:
            msg = await recv(ws, 5)
            assert msg["type"] == "session.created"
            assert SESSION_ID.match(msg["session"]["id"])

    async def test_every_configured_key_works(self, gateway: GatewayProcess) -> None:
        for key in TEST_KEYS:
            async with await connect(gateway.url, key) as ws:
                assert (await recv(ws, 5))["type"] == "session.created"

    @pytest.mark.parametrize(
        "key", ["wrong", TEST_KEYS[0][:-1], TEST_KEYS[0] + "x", "dev-key", " "]
    )
    async def test_server_closes_4001_for_a_wrong_key(
        self, gateway: GatewayProcess, key: str
    ) -> None:
        ws = await connect(gateway.url, key)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001
        assert ws.close_reason == "Unauthorized"

    async def test_server_closes_4001_for_a_non_bearer_header(
        self, gateway: GatewayProcess
    ) -> None:
        ws = await websockets.connect(
            gateway.url, additional_headers={"Authorization": f"Token {TEST_KEYS[0]}"}
        )
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001

    async def test_session_ids_are_unique(self, gateway: GatewayProcess) -> None:
        ids = set()
        for _ in range(5):
            async with await connect(gateway.url) as ws:
                ids.add((await recv(ws, 5))["session"]["id"])
        assert len(ids) == 5


class TestFirstMessageAuth:
    async def test_auth_message_then_session_created(self, gateway: GatewayProcess) -> None:
        ws = await connect(gateway.url, header=False)
        msg = await recv(ws, 5)
        assert msg["type"] == "session.created"
        assert SESSION_ID.match(msg["session"]["id"])
        await ws.close()

    async def test_nothing_is_sent_before_auth(self, gateway: GatewayProcess) -> None:
        async with websockets.connect(gateway.url) as ws:
            with pytest.raises(TimeoutError):
                await recv(ws, 0.5)

    async def test_wrong_token_closes_4001(self, gateway: GatewayProcess) -> None:
        ws = await connect(gateway.url, "nope", header=False)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001

    async def test_silent_client_is_closed_4001_after_auth_timeout(
        self, gateway: GatewayProcess
    ) -> None:
        started = time.monotonic()
        ws = await websockets.connect(gateway.url)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 10)
        waited = time.monotonic() - started
        assert ws.close_code == 4001
        assert 1.0 < waited < 8.0  # the server's auth timeout is 1.5 s

    @pytest.mark.parametrize(
        "first",
        [
            '{"type": "session.update", "session": {"provider": "LOCAL", "model": "whisper-tiny.en"}}',
            '{"type": "audio.append", "audio": "AAAA"}',
            "not json",
            '{"type": "auth"}',
            '{"type": "auth", "token": 5}',
        ],
    )
    async def test_anything_but_auth_first_closes_4001_without_processing(
        self, gateway: GatewayProcess, first: str
    ) -> None:
        before = gateway.health()["streams"]["LOCAL"]
        ws = await websockets.connect(gateway.url)
        await ws.send(first)
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001
        # No engine stream was opened for an unauthenticated client.
        assert gateway.health()["streams"]["LOCAL"] == before

    async def test_audio_sent_before_auth_is_not_processed(self, gateway: GatewayProcess) -> None:
        ws = await websockets.connect(gateway.url)
        await ws.send(json.dumps({"type": "audio.append", "audio": "AAAA" * 100}))
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001


class TestKeysStayOutOfLogs:
    async def test_keys_never_appear_in_server_logs(self, gateway: GatewayProcess) -> None:
        ws, _ = await open_session(gateway.url)
        await ws.close()
        bad = await connect(gateway.url, "secret-wrong-key-xyz")
        with pytest.raises(websockets.ConnectionClosed):
            await recv(bad, 5)
        logs = gateway.logs()
        assert "session created" in logs  # the log is really captured
        for key in (*TEST_KEYS, "secret-wrong-key-xyz"):
            assert key not in logs
