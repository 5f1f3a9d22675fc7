"""Short-lived session tokens: ``POST /v1/tokens`` and their use in the ``auth`` message.

Against a real server (the shared ``gateway`` fixture) over real sockets; the
sans-I/O parts of :mod:`transcribe_gateway.server.tokens` are tested directly.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.server.wsutil import connect, recv
from transcribe_gateway.server.auth import fingerprint
from transcribe_gateway.server.tokens import MemoryTokenLedger, TokenIssuer
from transcribe_gateway.store.keys import TOKEN_CLOCK_SKEW_S


def post(url: str, *, key: str | None = None, body: Any = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:  # not one of ours (e.g. a 405 from the static files)
            return exc.code, {"text": body.decode(errors="replace")}


def mint(gateway: GatewayProcess, **body: Any) -> dict[str, Any]:
    status, reply = post(f"{gateway.http}/v1/tokens", key=TEST_KEYS[0], body=body or None)
    assert status == 200, reply
    return reply


async def first_message(gateway: GatewayProcess, token: str) -> tuple[dict[str, Any] | None, int]:
    """Authenticate with the ``auth`` message: (first server message or None, close code)."""
    ws = await connect(gateway.url, token, header=False)
    try:
        msg = await recv(ws, 5)
    except websockets.ConnectionClosed:
        return None, ws.close_code or 0
    await ws.close()
    return msg, 1000


class TestIssue:
    def test_client_gets_a_token_with_the_default_ttl(self, gateway: GatewayProcess) -> None:
        before = time.time()
        reply = mint(gateway)
        assert reply["token"].startswith("tst_")
        assert reply["ttl_s"] == 60
        assert before + 59 <= reply["expires_at"] <= time.time() + 61

    def test_server_caps_the_ttl(self, gateway: GatewayProcess) -> None:
        assert mint(gateway, ttl_s=10)["ttl_s"] == 10
        assert mint(gateway, ttl_s=100_000)["ttl_s"] == 300  # token_max_ttl_s default

    def test_server_refuses_a_bad_key_with_401(self, gateway: GatewayProcess) -> None:
        status, reply = post(f"{gateway.http}/v1/tokens", key="not-a-key")
        assert status == 401 and reply["error"]["code"] == "unauthorized"
        status, _ = post(f"{gateway.http}/v1/tokens")
        assert status == 401

    def test_refusals_are_not_cached_either(self, gateway: GatewayProcess) -> None:
        for key, body in (("not-a-key", b""), (TEST_KEYS[0], b'{"ttl_s": 0}')):
            request = urllib.request.Request(
                f"{gateway.http}/v1/tokens",
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {key}"},
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code in (400, 401)
            assert refused.value.headers["Cache-Control"] == "no-store"

    def test_a_token_cannot_mint_another(self, gateway: GatewayProcess) -> None:
        status, _ = post(f"{gateway.http}/v1/tokens", key=mint(gateway)["token"])
        assert status == 401

    @pytest.mark.parametrize("body", [{"ttl_s": "60"}, {"ttl_s": 0}, {"ttl": 5}, [1]])
    def test_server_refuses_a_bad_body_with_400(
        self, gateway: GatewayProcess, body: object
    ) -> None:
        status, reply = post(f"{gateway.http}/v1/tokens", key=TEST_KEYS[0], body=body)
        assert status == 400 and reply["error"]["code"] == "invalid_value"

    @pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
    def test_other_methods_get_405(self, gateway: GatewayProcess, method: str) -> None:
        # The demo page's catch-all answered them (a GET got 404).
        request = urllib.request.Request(f"{gateway.http}/v1/tokens", method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 405
        assert caught.value.headers["Allow"] == "POST"


class TestUse:
    async def test_token_opens_one_session_then_is_refused_4001(
        self, gateway: GatewayProcess
    ) -> None:
        token = mint(gateway)["token"]
        msg, _ = await first_message(gateway, token)
        assert msg is not None and msg["type"] == "session.created"
        msg, code = await first_message(gateway, token)
        assert msg is None and code == 4001

    async def test_token_works_in_the_bearer_header_too(self, gateway: GatewayProcess) -> None:
        token = mint(gateway)["token"]
        async with websockets.connect(
            gateway.url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            assert (await recv(ws, 5))["type"] == "session.created"

    async def test_expired_token_is_refused_4001(self, gateway: GatewayProcess) -> None:
        token = mint(gateway, ttl_s=1)["token"]
        await asyncio.sleep(2.1)  # expiry has a one-second resolution
        msg, code = await first_message(gateway, token)
        assert msg is None and code == 4001

    async def test_forged_token_is_refused_4001(self, gateway: GatewayProcess) -> None:
        token = mint(gateway)["token"]
        body, _, signature = token.rpartition(".")
        tampered = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + signature
        resigned = TokenIssuer("another-secret", 300).issue(
            f"static-{fingerprint(TEST_KEYS[0])}", 60
        )[0]
        for forged in (tampered, resigned, body + ".", "tst_", "tst_x.y"):
            msg, code = await first_message(gateway, forged)
            assert msg is None and code == 4001, forged
        # The untouched token still works: refusals did not burn it.
        msg, _ = await first_message(gateway, token)
        assert msg is not None and msg["type"] == "session.created"

    async def test_a_used_token_stays_used_after_a_restart(self, tmp_path: Path) -> None:
        # With a configured token_secret a token verifies on the restarted server:
        # the ledger in the store file must still know it was used.
        env = {
            "TRANSCRIBE_TOKEN_SECRET": "restart-test-secret",
            "TRANSCRIBE_STORE_PATH": str(tmp_path / "store.db"),
        }
        first = GatewayProcess("tokens-restart-1", env)
        try:
            token = mint(first)["token"]
            msg, _ = await first_message(first, token)
            assert msg is not None and msg["type"] == "session.created"
        finally:
            first.stop()
        second = GatewayProcess("tokens-restart-2", env)
        try:
            fresh = mint(second)["token"]
            msg, code = await first_message(second, token)
            assert msg is None and code == 4001
            msg, _ = await first_message(second, fresh)  # the ledger still admits new ones
            assert msg is not None and msg["type"] == "session.created"
        finally:
            second.stop()

    async def test_tokens_never_appear_in_server_logs(self, gateway: GatewayProcess) -> None:
        token = mint(gateway)["token"]
        await first_message(gateway, token)
        await first_message(gateway, token)
        await asyncio.sleep(0.2)
        signature = token.rpartition(".")[2]
        assert signature not in gateway.logs()


class TestIssuer:
    """The signed format and the ledger, without a server."""

    def test_verify_accepts_own_tokens_and_any_replica_with_the_secret(self) -> None:
        issuer = TokenIssuer("shared", 300)
        token, expires_at = issuer.issue("static-abcd1234", 60, now=1000.0)
        claims = TokenIssuer("shared", 300).verify(token, now=1001.0)
        assert claims is not None
        assert claims.key_id == "static-abcd1234" and claims.expires_at == expires_at == 1060.0
        assert TokenIssuer("other", 300).verify(token, now=1001.0) is None
        assert issuer.verify(token, now=1060.0) is None  # expired at exactly exp

    def test_a_token_lives_at_least_its_ttl(self) -> None:
        issuer = TokenIssuer("shared", 300)
        token, expires_at = issuer.issue("k", 60, now=1000.9)
        assert expires_at == 1061.0
        assert issuer.verify(token, now=1060.8) is not None  # 59.9 s after issue

    def test_ttl_defaults_to_60_and_is_capped(self) -> None:
        issuer = TokenIssuer("s", 120)
        assert issuer.ttl_for(None) == 60
        assert issuer.ttl_for(500) == 120
        assert TokenIssuer("s", 30).ttl_for(None) == 30

    async def test_redeem_is_single_use(self) -> None:
        issuer = TokenIssuer("s", 300)
        token, _ = issuer.issue("k", 60)
        assert await issuer.redeem(token) is not None
        assert await issuer.redeem(token) is None

    async def test_ledger_keeps_a_used_token_past_its_expiry(self) -> None:
        # After the clock steps back (NTP), a token that had expired verifies
        # again for a while: the ledger must still know it was used.
        ledger = MemoryTokenLedger()
        now = time.time()
        assert await ledger.claim("a", now - 10)
        assert not await ledger.claim("a", now - 10)

    async def test_ledger_forgets_expired_entries_and_is_bounded(self) -> None:
        ledger = MemoryTokenLedger(max_entries=2)
        now = time.time()
        # Expired longer ago than the clock skew allowed: dropped on the next claim.
        assert await ledger.claim("a", now - TOKEN_CLOCK_SKEW_S - 1)
        assert await ledger.claim("b", now + 60)
        assert await ledger.claim("c", now + 60)
        assert len(ledger) == 2
        assert not await ledger.claim("d", now + 60)  # full: refuse rather than forget
        assert not await ledger.claim("b", now + 60)
