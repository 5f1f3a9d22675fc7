"""Shutdown when a store call swallows the cancellation (Python 3.11, redis-py).

On 3.11, ``asyncio.wait_for`` (redis-py's socket timeouts) returns the call's
result instead of raising ``CancelledError`` when the call completes as the task
is cancelled (CPython gh-86296). The stores below answer the same way, at a
chosen moment, so that the loops' exit does not depend on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.ops.conftest import Live
from transcribe_gateway.config import Settings, StoreSettings
from transcribe_gateway.server import app
from transcribe_gateway.server.app import Gateway
from transcribe_gateway.server.limits import Admission, Grant, _Window
from transcribe_gateway.store.keys import KeyLimits, KeyRecord
from transcribe_gateway.store.usage import UsageRecord


class SwallowingStore:
    """Each call waits until cancelled; the first swallows its cancellation and
    answers (as ``wait_for`` does), or fails when ``fail`` says so; the calls after
    it are counted (``again``): a loop that stopped would make none."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0
        self.entered = asyncio.Event()
        self.again = asyncio.Event()

    async def _call(self) -> None:
        self.calls += 1
        if self.calls > 1:
            self.again.set()
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.calls > 1:
                raise
        if self.fail:  # answered late, then the connection broke
            raise RedisConnectionError("Connection closed by server.")

    async def get_keys(self, key_ids: list[str]) -> dict[str, KeyRecord]:
        await self._call()
        return {}

    async def add_messages(self, key_id: str, window: int, count: int) -> int:
        await self._call()
        return count

    async def record_usage(self, record: UsageRecord) -> None:
        await self._call()

    async def release_slot(self, key_id: str, session_id: str) -> None:
        return None


async def stops(task: asyncio.Task[None], store: SwallowingStore) -> bool:
    """Cancel ``task`` once it is in a store call: True when it ends, False when it
    calls the store again instead (it ran on)."""
    await store.entered.wait()
    task.cancel()
    again = asyncio.create_task(store.again.wait())
    await asyncio.wait({task, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    stopped = task.done()
    task.cancel()  # ran on: the next call does not swallow it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stopped


def settings(backend: Literal["sqlite", "redis"] = "sqlite") -> Settings:
    store = StoreSettings(backend=backend, redis_url="redis://unused", recheck_interval_s=0.01)
    return Settings(store=store)


class TestSwallowedCancellation:
    async def test_the_ops_tick_stops_when_a_store_call_swallows_its_cancellation(self) -> None:
        store = SwallowingStore()
        gate = Admission(settings(), store)  # type: ignore[arg-type]
        live = Live(Grant("key_a", "a", KeyLimits(), stored=True), "ts_1")
        task = asyncio.create_task(gate.run([live]))  # type: ignore[list-item]
        assert await stops(task, store)
        assert task.cancelled() and store.calls == 1

    async def test_the_rate_sync_stops_when_a_store_call_swallows_its_cancellation(
        self,
    ) -> None:
        store = SwallowingStore()
        gate = Admission(settings("redis"), store)  # type: ignore[arg-type]
        # A window that stays current while the test runs, with a message to share.
        gate._rates["key_a"] = _Window(int(time.time()) + 3600, local=1)
        task = asyncio.create_task(gate._sync_rates())
        assert await stops(task, store)
        assert task.cancelled() and store.calls == 1

    async def test_a_usage_write_stops_retrying_when_its_cancellation_was_swallowed(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Shutdown cancels the records still waiting (flush_usage): one whose failing
        # write swallowed the cancellation must not go on retrying for 10 minutes.
        store = SwallowingStore(fail=True)
        gate = Admission(settings(), store)  # type: ignore[arg-type]
        grant = Grant("key_a", "a", KeyLimits(), stored=True)
        await gate.end(grant, "ts_1", "LOCAL", "m", "shutdown", 1.0)
        (writing,) = gate._usage_writes
        assert await stops(writing, store)
        assert store.calls == 1
        assert "usage not recorded: shut down" in caplog.text


class Closable:
    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


async def test_gateway_exits_though_an_ops_task_does_not_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as above
            await asyncio.Event().wait()
        await release.wait()

    monkeypatch.setattr(app, "OPS_STOP_S", 0.1, raising=False)  # absent before the bound
    gateway = Gateway.__new__(Gateway)  # only what aclose uses
    gateway.connections = set()
    gateway._ops = [asyncio.create_task(stubborn(), name="ops-tick")]
    gateway.registry = Closable()  # type: ignore[assignment]
    gateway.store = Closable()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.ERROR):
            # The bound is 0.1 s; 30 s only keeps a failure from hanging the tests.
            await asyncio.wait_for(gateway.aclose(), 30)
        assert gateway.store.closed and gateway.registry.closed  # type: ignore[attr-defined]
        assert "ops-tick did not stop" in caplog.text
    finally:
        release.set()
        await gateway._ops[0]
