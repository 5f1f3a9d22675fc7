"""A one-worker embedded engine whose only worker is kept busy, for the tests of
what the LOCAL streams do when decodes must wait (Whisper's and pocketsphinx's)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from transcribe_gateway.config import LocalSettings, Settings
from transcribe_gateway.exceptions import ProviderUnavailable
from transcribe_gateway.providers.base import StreamOptions
from transcribe_gateway.providers.local import LocalSTT
from transcribe_gateway.providers.pool import LATE_FINALS_S


@dataclass
class HeldWorker:
    """A one-worker engine whose only worker is busy until :meth:`release`."""

    stt: LocalSTT
    gate: threading.Event
    holder: asyncio.Task[bool]

    async def until_waiting(self, decodes: int) -> None:
        """Return once ``decodes`` decodes wait for the worker."""
        async with asyncio.timeout(60):
            while self.stt.pool.waiting < decodes:  # noqa: ASYNC110 (the pool has no event for it)
                await asyncio.sleep(0.01)

    async def release(self) -> None:
        self.gate.set()
        await self.holder

    async def check_admission(self, model: str, late: bool) -> None:
        """After one final, with the worker free again: ``late`` (a real-time
        stream's final came over ``LATE_FINALS_S`` after its endpoint) means the
        engine refuses a new session of ``model``; otherwise it admits one."""
        stt = self.stt
        assert stt.pool.busy == 0 and stt.pool.waiting == 0
        assert (stt.pool.final_lateness > LATE_FINALS_S) is late
        if late:
            with pytest.raises(ProviderUnavailable, match="saturated"):
                await stt.open_stream(StreamOptions(model=model))
        else:
            stream = await stt.open_stream(StreamOptions(model=model))
            await stream.aclose()


@contextlib.asynccontextmanager
async def held_worker(load_whisper: bool = True) -> AsyncIterator[HeldWorker]:
    """``load_whisper``: start the engine (loads Whisper, which pocketsphinx
    streams do not use)."""
    stt = LocalSTT(Settings(local=LocalSettings(workers=1)))
    if load_whisper:
        await stt.start()
    gate = threading.Event()
    try:
        holder = asyncio.create_task(stt.pool.run(lambda: gate.wait(60)))
        await asyncio.sleep(0)  # an idle pool's slot is taken without waiting
        assert stt.pool.busy == 1
        yield HeldWorker(stt, gate, holder)
    finally:
        gate.set()
        await stt.aclose()
