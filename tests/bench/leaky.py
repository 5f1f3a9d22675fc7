"""``LEAKY``: the bench's ``NOOP`` provider, but each stream keeps 100 KiB for ever.

A gateway plugin for the soak's memory check (``tests/bench/test_soak.py``): a
leak per session that the 10% RSS check lets through in a short soak.
"""

from __future__ import annotations

from noop_provider import NoopStream, NoopSTT
from transcribe_gateway.providers.base import RecognizeStream, StreamOptions

LEAK_BYTES = 100 * 1024
HELD: list[bytearray] = []


class LeakySTT(NoopSTT):
    async def open_stream(self, options: StreamOptions) -> RecognizeStream:
        HELD.append(bytearray(b"x" * LEAK_BYTES))  # written, so resident
        stream = NoopStream(self, options)
        stream.start()
        return stream
