"""Streaming sample-rate conversion with soxr (chunk by chunk, no edge clicks)."""

from __future__ import annotations

import numpy as np
import soxr

from transcribe_gateway.audio.decode import Samples


class Resampler:
    """Convert a stream of int16 chunks from one rate to another.

    A pass-through when the rates are equal.  soxr keeps filter state across
    chunks, so 20 ms pieces resample as well as one long signal.

    The stream runs in float32 and rounds to int16 here: soxr's int16 output
    adds dither (libsoxr's TPDF, a fresh seed per stream), so the same audio came
    out up to 2 LSB different in every process, enough to move a VAD cut or a
    word.  Rounding ourselves makes a session's audio the same on every run.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        )

    def push(self, samples: Samples, *, last: bool = False) -> Samples:
        """Resample one chunk; with ``last`` also return what soxr still holds."""
        if self._stream is None:
            return samples
        out = self._stream.resample_chunk(samples.astype(np.float32), last=last)
        return to_int16(out)

    def flush(self) -> Samples:
        """Return the samples still held in the filter (end of stream)."""
        return self.push(np.zeros(0, dtype=np.int16), last=True)


def to_int16(samples: np.ndarray) -> Samples:
    """Round float samples (int16 scale) to int16, clipping the filter's overshoot."""
    # In place with minimum/maximum: np.clip's wrapper costs more than the
    # arithmetic on a 20 ms chunk.
    rounded = np.rint(samples)
    np.minimum(rounded, 32767, out=rounded)
    np.maximum(rounded, -32768, out=rounded)
    out: Samples = rounded.astype(np.int16)
    return out


def resample(samples: Samples, in_rate: int, out_rate: int) -> Samples:
    """Resample a whole signal at once."""
    if in_rate == out_rate:
        return samples
    out = soxr.resample(samples, in_rate, out_rate)
    return np.asarray(out, dtype=np.int16)
