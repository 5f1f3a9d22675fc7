"""One gateway process wired to an emulator of every cloud provider.

The emulators run in the test process on real ports; the gateway finds them
through ``<PROVIDER>_BASE_URL`` and authenticates with ``<PROVIDER>_API_KEY``,
exactly as it would reach the real services.  Timeouts are short so the
failure tests (a provider that stops answering) run quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.conftest import GatewayProcess
from tests.emulators.catalog import CASES, CloudCase
from tests.emulators.server import Emulator, Faults

RESPONSE_TIMEOUT_S = 3.0
FINALIZE_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 3.0


@dataclass
class CloudWorld:
    gateway: GatewayProcess
    emulators: dict[str, Emulator]

    def emulator(self, case: CloudCase) -> Emulator:
        return self.emulators[case.provider]


@pytest.fixture(scope="session")
async def cloud() -> AsyncIterator[CloudWorld]:
    emulators: dict[str, Emulator] = {}
    async with contextlib.AsyncExitStack() as stack:
        for case in CASES:
            if case.provider not in emulators:
                emulators[case.provider] = await stack.enter_async_context(case.emulator())
        env = {
            "TRANSCRIBE_PROVIDER_RESPONSE_TIMEOUT_S": str(RESPONSE_TIMEOUT_S),
            "TRANSCRIBE_PROVIDER_FINALIZE_TIMEOUT_S": str(FINALIZE_TIMEOUT_S),
            "TRANSCRIBE_PROVIDER_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
            "TRANSCRIBE_STRICT_PROVIDERS": "true",
            "TRANSCRIBE_IDLE_TIMEOUT_S": "10",
        }
        for name, emulator in emulators.items():
            env[f"{name}_API_KEY"] = emulator.api_key
            env[f"{name}_BASE_URL"] = emulator.url
        gateway = await asyncio.to_thread(GatewayProcess, "cloud", env)
        try:
            yield CloudWorld(gateway, emulators)
        finally:
            await asyncio.to_thread(gateway.stop)


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest, cloud: CloudWorld) -> CloudCase:
    """Each test once per provider model, with the faults reset."""
    chosen: CloudCase = request.param
    cloud.emulator(chosen).faults = Faults()
    return chosen
