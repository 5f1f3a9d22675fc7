"""Streaming sample-rate conversion with soxr (chunk by chunk, no edge clicks)."""

from __future__ import annotations

import numpy as np
import soxr

from transcribe_gateway.audio.decode import Samples


class Resampler:
    """Convert a stream of int16 chunks from one rate to another.

    A pass-through when the rates are equal.  soxr keeps filter state across
    chunks, so 20 ms pieces resample as well as one long signal.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16")
        )

    def push(self, samples: Samples, *, last: bool = False) -> Samples:
        """Resample one chunk; with ``last`` also return what soxr still holds."""
        if self._stream is None:
            return samples
        out: Samples = self._stream.resample_chunk(samples, last=last)
        return out.astype(np.int16, copy=False)

    def flush(self) -> Samples:
        """Return the samples still held in the filter (end of stream)."""
        return self.push(np.zeros(0, dtype=np.int16), last=True)


def resample(samples: Samples, in_rate: int, out_rate: int) -> Samples:
    """Resample a whole signal at once."""
    if in_rate == out_rate:
        return samples
    out = soxr.resample(samples, in_rate, out_rate)
    return np.asarray(out, dtype=np.int16)
