"""A provider plugin (``SLOWSTART``) whose ``start`` takes 3 s, as loading large
weights on a cold cache may: for signals that come while the server starts."""

from __future__ import annotations

import asyncio
import logging

from tests.plugins.faulty import FaultySTT

log = logging.getLogger(__name__)


class SlowStartSTT(FaultySTT):
    provider = "SLOWSTART"

    async def start(self) -> None:
        log.warning("slow start: warming up")
        await asyncio.sleep(3)
