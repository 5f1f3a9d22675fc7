"""A stream's recent audio, addressed by sample index since the stream began."""

from __future__ import annotations

from collections import deque

import numpy as np

from transcribe_gateway.audio.decode import Samples


class AudioBuffer:
    """Samples ``[start, end)`` of a stream, kept as the chunks they arrived in.

    Appending and discarding old audio never copy (chunks are dropped whole, or
    sliced as views); only :meth:`slice` copies, once per decode.
    """

    def __init__(self) -> None:
        self._chunks: deque[Samples] = deque()
        self.start = 0
        """Stream index of the first sample held."""
        self.end = 0
        """Stream index after the last sample held (= samples appended so far)."""

    def append(self, samples: Samples) -> None:
        if len(samples):
            self._chunks.append(samples)
            self.end += len(samples)

    def slice(self, start: int, end: int) -> Samples:
        """A copy of samples ``[start, end)``, clipped to what is held."""
        start, end = max(start, self.start), min(end, self.end)
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        parts: list[Samples] = []
        position = self.start
        for chunk in self._chunks:
            chunk_end = position + len(chunk)
            if chunk_end > start and position < end:
                parts.append(chunk[max(0, start - position) : end - position])
            if chunk_end >= end:
                break
            position = chunk_end
        return np.concatenate(parts)

    def discard_before(self, index: int) -> None:
        """Forget samples before stream index ``index``."""
        index = min(index, self.end)
        while self._chunks and self.start + len(self._chunks[0]) <= index:
            self.start += len(self._chunks.popleft())
        if self._chunks and index > self.start:
            self._chunks[0] = self._chunks[0][index - self.start :]
            self.start = index

    def clear(self) -> None:
        self.discard_before(self.end)
