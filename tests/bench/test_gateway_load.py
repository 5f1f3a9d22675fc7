"""bench/gateway_load.py's load generator, run small: failed sessions are counted, never a hang.

Its sessions are the benchmark's errors figure: one the gateway refuses at
open, or closes mid-run, must count as an error, whichever client drives the
load, and the run must go on to its figures.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.harness import bench_gateway, gateway_load, server_of
from tests.conftest import free_port

CLIENTS = ["websockets", "picows"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_sessions_refused_at_open_are_errors(client: str) -> None:
    # The key may hold 2 sessions: of 5 opened at once, 3 get error
    # too_many_sessions and close 4029 before session.created.
    gateway = bench_gateway(f"bench-refused-{client}", TRANSCRIBE_MAX_SESSIONS_PER_KEY="2")
    try:
        level = await asyncio.wait_for(
            gateway_load.run_level(server_of(gateway), 5, 0.6, 0.2, client), 30
        )
    finally:
        gateway.stop()
    assert level.errors == 3
    assert level.latencies  # the 2 admitted sessions were measured
    assert level.chunks


@pytest.fixture
def closing_server() -> Iterator[gateway_load.Server]:
    """``closing_server.py``, fresh (it closes its third session)."""
    port = free_port()
    script = Path(__file__).with_name("closing_server.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port)])
    server = gateway_load.Server("closing", proc, f"ws://127.0.0.1:{port}/ws")
    try:
        gateway_load.wait_port(port, proc, timeout=30)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_session_closed_mid_run_is_an_error(
    closing_server: gateway_load.Server, client: str
) -> None:
    # One of the 4 sessions is closed by the server (1011, no event) 0.4 s in.
    level = await asyncio.wait_for(gateway_load.run_level(closing_server, 4, 1.0, 0.2, client), 30)
    assert level.errors == 1
    assert level.latencies
    assert level.chunks
