"""How long the event loop was kept from running while some work went on: for the
tests that a LOCAL stream never stalls every other session of the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import numpy as np

from transcribe_gateway.providers.base import RecognizeStream

T = TypeVar("T")


async def longest_stall(work: Awaitable[T], tick_s: float = 0.005) -> tuple[T, float]:
    """Await ``work`` while a task ticks every ``tick_s``; its result and the longest
    a tick came late (seconds), which is how long the loop was blocked at most."""
    loop = asyncio.get_running_loop()
    late = [0.0]
    due = loop.time() + tick_s

    async def tick() -> None:
        nonlocal due
        while True:
            due = loop.time() + tick_s
            await asyncio.sleep(tick_s)
            late.append(loop.time() - due)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(2 * tick_s)  # ticking before the work starts
    try:
        result = await work
    finally:
        # A tick still due counts too: work that never yields blocks it to the end.
        late.append(loop.time() - due)
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
    return result, max(late)


async def push_all(stream: RecognizeStream, chunks: Iterable[np.ndarray]) -> int:
    """Push each chunk as the gateway does: at once when the stream takes it, else
    awaited. Returns how many were awaited (the stream pushed back)."""
    waited = 0
    for chunk in chunks:
        if not stream.push_audio_nowait(chunk):
            waited += 1
            await stream.push_audio(chunk)
    return waited
