"""The benchmark harness (``bench/``), importable from tests, and gateways to run it against.

The bench scripts import each other as top-level modules (``soak`` does ``from
gateway_load import ...``), so ``bench/`` goes on ``sys.path`` and they are
imported the same way here.
"""

from __future__ import annotations

import os
import sys

from tests.conftest import ROOT, GatewayProcess

BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gateway_load  # noqa: E402
import local_engine  # noqa: E402
import soak  # noqa: E402

__all__ = ["bench_gateway", "gateway_load", "local_engine", "soak"]

NOOP_PLUGIN = "bench.noop_provider:NoopSTT"


def bench_gateway(name: str, plugin: str = NOOP_PLUGIN, **env: str) -> GatewayProcess:
    """A gateway as the harness starts one: the bench key, the ``NOOP`` provider
    (or ``plugin``), and ``env``; with the tests' own store and log files."""
    return GatewayProcess(
        name,
        env={
            "TRANSCRIBE_API_KEYS": gateway_load.KEY,
            "TRANSCRIBE_PLUGINS": plugin,
            # bench/ too: a plugin of tests/bench may build on noop_provider.
            "PYTHONPATH": f"{ROOT}{os.pathsep}{BENCH}",
            **env,
        },
    )


def server_of(gateway: GatewayProcess, name: str = "gateway") -> gateway_load.Server:
    """``gateway`` as the load generator's :class:`gateway_load.Server`."""
    return gateway_load.Server(name, gateway.proc, gateway.url)
