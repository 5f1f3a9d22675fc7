"""Which web pages may use the gateway (``allowed_origins``, the ``Origin`` and ``Host`` checks).

Browsers let any page open a WebSocket to ``localhost`` and name the page in
``Origin``: with the development profile's public ``dev-key``, any site a
developer visits could run sessions on their gateway, and a name rebound to
127.0.0.1 could take tokens from ``/demo/token``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import websockets

from tests.conftest import TEST_KEYS, GatewayProcess
from transcribe_gateway.config import DEV_KEY
from transcribe_gateway.server.origins import OriginPolicy, is_local_origin, is_loopback_host

EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def dev_key_server() -> Iterator[GatewayProcess]:
    """Development profile and no key configured: ``dev-key``, which anyone knows."""
    server = GatewayProcess("origins-dev-key", env={"TRANSCRIBE_API_KEYS": ""})
    yield server
    server.stop()


async def first_event(url: str, key: str, origin: str | None) -> str:
    """The first event's type, or the HTTP status that refused the upgrade."""
    try:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {key}"},
            origin=origin,  # type: ignore[arg-type]  # websockets types it as a str subtype
        )
    except websockets.InvalidStatus as refused:
        return str(refused.response.status_code)
    async with ws:
        kind: str = json.loads(await ws.recv())["type"]
        return kind


class TestDevelopmentKey:
    async def test_a_page_elsewhere_cannot_use_the_public_key(
        self, dev_key_server: GatewayProcess
    ) -> None:
        url = dev_key_server.url
        assert await first_event(url, DEV_KEY, EVIL) == "403"
        # A file opened in the browser or a sandboxed frame of any site.
        assert await first_event(url, DEV_KEY, "null") == "403"
        # A name rebound to 127.0.0.1 is still the other site's page.
        assert (
            await first_event(url, DEV_KEY, f"http://evil.example:{dev_key_server.port}") == "403"
        )
        assert "origin not allowed" in dev_key_server.logs()
        # A client's header, logged: bounded and quoted.
        assert await first_event(url, DEV_KEY, "https://x.example/" + "a" * 8000) == "403"
        line = dev_key_server.logs().splitlines()[-1]
        assert 'origin="https://x.example/aaa' in line or "origin=https://x.example/aaa" in line
        assert len(line) < 600, line

    async def test_pages_on_this_machine_and_other_clients_connect(
        self, dev_key_server: GatewayProcess
    ) -> None:
        url, port = dev_key_server.url, dev_key_server.port
        for origin in (
            f"http://127.0.0.1:{port}",  # the demo page this gateway serves
            "http://localhost:5173",  # a web app in development beside it
            "http://[::1]:3000",
            None,  # not a browser: the CLI, the SDKs, a server
        ):
            assert await first_event(url, DEV_KEY, origin) == "session.created", origin

    def test_demo_token_refuses_a_rebound_name_and_other_pages(
        self, dev_key_server: GatewayProcess
    ) -> None:
        port = dev_key_server.port

        def status(headers: dict[str, str]) -> int:
            request = urllib.request.Request(
                f"{dev_key_server.http}/demo/token", data=b"", headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:
                    assert "token" in json.loads(r.read())
                    return int(r.status)
            except urllib.error.HTTPError as refused:
                return refused.code

        assert status({"Host": f"evil.example:{port}"}) == 403
        assert (
            status({"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}) == 403
        )
        assert status({"Origin": EVIL}) == 403
        assert status({"Origin": f"http://127.0.0.1:{port}"}) == 200
        assert status({}) == 200


async def test_with_real_keys_any_page_may_connect(gateway: GatewayProcess) -> None:
    # A secret key is the page's own (a token its backend minted): no origin list needed.
    assert await first_event(gateway.url, TEST_KEYS[0], EVIL) == "session.created"


async def test_allowed_origins_admit_exactly_those_pages() -> None:
    server = GatewayProcess(
        "origins-allowed", env={"TRANSCRIBE_ALLOWED_ORIGINS": "https://app.example.com/"}
    )
    try:
        key = TEST_KEYS[0]
        assert await first_event(server.url, key, "https://APP.example.com") == "session.created"
        assert await first_event(server.url, key, EVIL) == "403"
        assert await first_event(server.url, key, "http://app.example.com") == "403"  # the scheme
        assert await first_event(server.url, key, None) == "session.created"
    finally:
        server.stop()


def test_origin_rules() -> None:
    assert is_loopback_host("localhost:8000") and is_loopback_host("app.localhost")
    assert is_loopback_host("127.0.0.2:1") and is_loopback_host("[::1]:8000")
    assert not is_loopback_host("localhost.evil.example") and not is_loopback_host("10.0.0.1")
    assert not is_loopback_host("[::1") and not is_loopback_host("")
    # Served by this gateway at an address (a LAN demo): its origin is the Host.
    assert is_local_origin("http://192.168.1.5:8000", "192.168.1.5:8000")
    assert not is_local_origin("http://192.168.1.9:8000", "192.168.1.5:8000")
    assert not is_local_origin("http://gateway.lan:8000", "gateway.lan:8000")  # a name
    assert not is_local_origin("ws://localhost", None) and not is_local_origin("null", None)
    anyone = OriginPolicy(["*"], public_key=True)
    assert anyone.allows(EVIL, None)
    assert OriginPolicy([], public_key=False).allows(EVIL, None)
    assert not OriginPolicy([], public_key=True).allows(EVIL, "localhost:8000")
