"""Two replicas sharing ``token_secret``: a token minted by one opens a session on the other.

The second replica runs the production profile: no demo token helper there.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import TEST_KEYS, GatewayProcess
from tests.web.test_tokens import first_message, post

SECRET = "replicas-share-this-secret-0123456789"


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    env = {"TRANSCRIBE_TOKEN_SECRET": SECRET}
    first = GatewayProcess("tokens-a", env=env)
    try:
        second = GatewayProcess("tokens-b", env={**env, "TRANSCRIBE_PROFILE": "production"})
    except Exception:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


async def test_token_from_one_replica_opens_a_session_on_another(
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = replicas
    status, reply = post(f"{first.http}/v1/tokens", key=TEST_KEYS[1])
    assert status == 200
    msg, _ = await first_message(second, reply["token"])
    assert msg is not None and msg["type"] == "session.created"
    msg, code = await first_message(second, reply["token"])
    assert msg is None and code == 4001


def test_production_has_no_demo_token_helper(
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    _, production = replicas
    status, _ = post(f"{production.http}/demo/token")
    assert status in (404, 405)
    with urllib.request.urlopen(f"{production.http}/v1/providers", timeout=10) as r:
        listing = json.loads(r.read())
    assert listing["profile"] == "production"
    assert all(p["substitute"] is None for p in listing["providers"])
    with urllib.request.urlopen(f"{production.http}/", timeout=10) as r:  # the page still loads
        assert b"transcribe-gateway" in r.read()


def test_without_a_shared_secret_the_server_says_replicas_need_one(
    gateway: GatewayProcess,
) -> None:
    assert "TRANSCRIBE_TOKEN_SECRET" in gateway.logs()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{gateway.http}/no-such-page", timeout=10)
