"""Tokens for keys managed in the store (``transcribe-gateway keys``): scope and revocation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.conftest import GatewayProcess
from tests.ops.conftest import create_key, run_cli
from tests.web.test_tokens import first_message, post


@pytest.fixture(scope="module")
def store_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"TRANSCRIBE_STORE_PATH": str(tmp_path_factory.mktemp("tokens") / "keys.db")}


@pytest.fixture(scope="module")
def store_gateway(store_env: dict[str, str]) -> Iterator[GatewayProcess]:
    env = {**store_env, "TRANSCRIBE_STORE_RECHECK_INTERVAL_S": "0.5"}
    server = GatewayProcess("tokens-store", env=env)  # the store the CLI writes to
    yield server
    server.stop()


async def test_stored_key_mints_a_token_that_opens_a_session(
    store_gateway: GatewayProcess, store_env: dict[str, str]
) -> None:
    key = create_key(store_env, "webapp", "--scope", "transcribe")
    status, reply = post(f"{store_gateway.http}/v1/tokens", key=key)
    assert status == 200, reply
    msg, _ = await first_message(store_gateway, reply["token"])
    assert msg is not None and msg["type"] == "session.created"


def test_key_without_the_transcribe_scope_gets_403(
    store_gateway: GatewayProcess, store_env: dict[str, str]
) -> None:
    key = create_key(store_env, "reports", "--scope", "usage")
    status, reply = post(f"{store_gateway.http}/v1/tokens", key=key)
    assert status == 403 and reply["error"]["code"] == "forbidden"


async def test_revoking_the_key_voids_its_unused_tokens(
    store_gateway: GatewayProcess, store_env: dict[str, str]
) -> None:
    key = create_key(store_env, "leaky")
    status, reply = post(f"{store_gateway.http}/v1/tokens", key=key)
    assert status == 200
    done = await asyncio.to_thread(run_cli, store_env, "keys", "revoke", "leaky")
    assert done.returncode == 0, done.stderr
    msg, code = await first_message(store_gateway, reply["token"])
    assert msg is None and code == 4001
    status, _ = post(f"{store_gateway.http}/v1/tokens", key=key)
    assert status == 401
