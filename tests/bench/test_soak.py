"""bench/soak.py run small: a session that did not work, or a leak, fails the soak."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import pytest

from tests.bench.harness import bench_gateway, gateway_load, server_of, soak
from tests.conftest import GatewayProcess


@pytest.fixture(scope="module")
def noop_gateway() -> Iterator[GatewayProcess]:
    gateway = bench_gateway("bench-soak")
    yield gateway
    gateway.stop()


async def test_a_session_whose_update_is_refused_did_not_end_as_expected(
    noop_gateway: GatewayProcess,
) -> None:
    workload = soak.noop_workload()
    assert await soak.one_session(noop_gateway.url, workload, workload.short, 0) is None
    refused = dataclasses.replace(workload, config={**workload.config, "model": "no-such-model"})
    why = await soak.one_session(noop_gateway.url, refused, refused.short, 0)
    assert why is not None
    assert why.startswith("session.update answered error"), why


async def test_a_noop_session_without_a_partial_did_not_end_as_expected(
    noop_gateway: GatewayProcess,
) -> None:
    # 0.1 s of audio: less than NOOP's 0.2 s a partial, so no engine event came.
    workload = soak.noop_workload()
    why = await soak.one_session(noop_gateway.url, workload, workload.short[:5], 0)
    assert why == "no transcription.partial"


async def run_soak(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    gateway: GatewayProcess,
    *args: str,
) -> tuple[int, str]:
    """``soak.py args`` against ``gateway`` (left running): its exit status and output."""
    monkeypatch.setattr(soak, "start_gateway", lambda name, cpu: server_of(gateway, name))
    monkeypatch.setattr(gateway_load.Server, "stop", lambda self: None)
    monkeypatch.setattr(sys, "argv", ["soak.py", *args])
    status = await soak.main()
    return status, capsys.readouterr().out


async def test_a_healthy_gateway_passes_and_0_skips_a_phase(
    noop_gateway: GatewayProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out = await run_soak(
        monkeypatch, capsys, noop_gateway, "--sequential", "100", "--concurrent", "0"
    )
    assert status == 0, out
    assert "100 sequential sessions" in out
    assert "RSS growth per sequential session" in out
    assert "concurrent" not in out
    status, out = await run_soak(
        monkeypatch, capsys, noop_gateway, "--sequential", "0", "--concurrent", "2"
    )
    assert status == 0, out
    assert "2 concurrent sessions, 2 ended as expected" in out
    assert "sequential" not in out


async def test_a_small_leak_per_session_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 100 KiB a session: 12 MB over warm-up and 100 sessions, within 10% of
    # the gateway's 250-350 MB, so only the figure per session catches it.
    gateway = bench_gateway("bench-soak-leaky", plugin="tests.bench.leaky:LeakySTT")
    try:
        status, out = await run_soak(
            monkeypatch, capsys, gateway, "--sequential", "100", "--concurrent", "0"
        )
    finally:
        gateway.stop()
    assert status == 1, out
    assert "KiB per session > " in out, out
    assert "110%" not in out, out
