"""The signal handler of the uvicorn server that drains first (in process)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

import pytest

from transcribe_gateway.config import Settings, StoreSettings
from transcribe_gateway.server import runner


async def test_a_signal_nested_in_the_first_handler_forces_rather_than_drains_again(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python runs a signal handler between bytecodes, so a second SIGTERM can run
    # handle_exit inside the first call, before it recorded the drain: both
    # started one.
    server = runner.build_server(Settings(store=StoreSettings(path=str(tmp_path / "s.db"))))
    server._loop = asyncio.get_running_loop()  # as startup() sets it
    drains: list[object] = []

    def drain() -> Coroutine[Any, Any, None]:
        drains.append(None)
        return asyncio.sleep(0)

    monkeypatch.setattr(server, "_drain", drain)
    real_info = runner.log.info
    nested = False

    def info(*args: Any, **kwargs: Any) -> None:
        nonlocal nested
        if not nested:  # the second signal lands while the first is being logged
            nested = True
            server.handle_exit(signal.SIGTERM, None)
        real_info(*args, **kwargs)

    monkeypatch.setattr(runner.log, "info", info)
    server.handle_exit(signal.SIGTERM, None)
    assert nested
    assert len(drains) == 1
    assert server.force_exit and server.should_exit
    await asyncio.sleep(0)  # let the drain task run (and end)
