"""Streaming sample-rate conversion (chunk by chunk, no edge clicks).

soxr does it, except for one case: a whole-number upsampling (a phone line's
8 kHz to an engine's 16 or 24 kHz), where its stream gives its output in blocks
and held a phone session's audio back 63 ms on average (115 ms at worst), every
event of the session as late. That case is a small polyphase filter here, whose
only delay is its own half-length (12.5 ms).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import soxr

from transcribe_gateway.audio.decode import Samples

_STOPBAND_DB = 80.0
"""The upsampler's rejection of the images above the input's Nyquist."""
_PASSBAND = 0.95
"""Share of the input's Nyquist that the upsampler passes flat, as soxr's
filters do (0.9 cost pocketsphinx two command words in 25 on mu-law)."""


class Resampler:
    """Convert a stream of int16 chunks from one rate to another.

    A pass-through when the rates are equal.  The filter state is kept across
    chunks, so 20 ms pieces resample as well as one long signal.

    The stream runs in float32 and rounds to int16 here: soxr's int16 output
    adds dither (libsoxr's TPDF, a fresh seed per stream), so the same audio came
    out up to 2 LSB different in every process, enough to move a VAD cut or a
    word.  Rounding ourselves makes a session's audio the same on every run.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._upsampler = _Upsampler(in_rate, out_rate) if _whole_up(in_rate, out_rate) else None
        self._stream = (
            None
            if in_rate == out_rate or self._upsampler is not None
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
        )

    def push(self, samples: Samples, *, last: bool = False) -> Samples:
        """Resample one chunk; with ``last`` also return what the filter still holds."""
        if self._upsampler is not None:
            return to_int16(self._upsampler.push(samples.astype(np.float32), last=last))
        if self._stream is None:
            return samples
        out = self._stream.resample_chunk(samples.astype(np.float32), last=last)
        return to_int16(out)

    def flush(self) -> Samples:
        """Return the samples still held in the filter (end of stream)."""
        return self.push(np.zeros(0, dtype=np.int16), last=True)


def _whole_up(in_rate: int, out_rate: int) -> bool:
    """Whether this is the upsampling by a whole number that :class:`_Upsampler` does."""
    return out_rate > in_rate and out_rate % in_rate == 0


@functools.cache
def _phases(in_rate: int, factor: int) -> tuple[tuple[np.ndarray, ...], int]:
    """A Kaiser-windowed sinc low-pass at ``in_rate * factor`` that cuts at the
    input's Nyquist, split into its ``factor`` phases; and its delay in output
    samples."""
    rate = in_rate * factor
    nyquist = in_rate / 2
    width = (1 - _PASSBAND) * nyquist
    taps = math.ceil((_STOPBAND_DB - 8) / (2.285 * 2 * math.pi * width / rate)) + 1
    per_phase = -(-taps // factor)
    taps = per_phase * factor - 1  # odd: a delay of a whole number of samples
    if taps % 2 == 0:
        taps -= 1
    cutoff = (_PASSBAND + 1) / 2 * nyquist / rate  # mid-transition, cycles per sample
    t = np.arange(taps) - (taps - 1) / 2
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(taps, beta) * factor
    h = np.concatenate([h, np.zeros(per_phase * factor - taps)])
    phases = tuple(h[p::factor].astype(np.float32) for p in range(factor))
    return phases, (taps - 1) // 2


class _Upsampler:
    """Upsampling by a whole number, as a polyphase FIR filter (see the module's
    docstring for why not soxr).  Its output is aligned with its input, as
    soxr's is: the filter's delay is dropped at the start and given at the end."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.factor = out_rate // in_rate
        self._phases, self._delay = _phases(in_rate, self.factor)
        self._history = np.zeros(len(self._phases[0]) - 1, np.float32)
        self._skip = self._delay
        self._taken = 0
        """Input samples so far."""
        self._given = 0
        """Output samples so far."""

    def push(self, x: np.ndarray, *, last: bool) -> np.ndarray:
        if not len(x) and not last:
            return x
        self._taken += len(x)
        if last:  # zeros through the filter bring out what it holds
            x = np.concatenate([x, np.zeros(-(-self._delay // self.factor), np.float32)])
        signal = np.concatenate([self._history, x])
        self._history = signal[len(x) :]
        out = np.empty(len(x) * self.factor, np.float32)
        for p, phase in enumerate(self._phases):
            out[p :: self.factor] = np.convolve(signal, phase, "valid")
        if self._skip:
            skipped = min(self._skip, len(out))
            out, self._skip = out[skipped:], self._skip - skipped
        if last:
            out = out[: self._taken * self.factor - self._given]
        self._given += len(out)
        return out


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
    """Resample a whole signal at once (as a :class:`Resampler` would, in one chunk)."""
    if in_rate == out_rate:
        return samples
    if _whole_up(in_rate, out_rate):
        return Resampler(in_rate, out_rate).push(samples, last=True)
    out = soxr.resample(samples, in_rate, out_rate)
    return np.asarray(out, dtype=np.int16)
