"""AudioBuffer: stream-indexed audio history."""

from __future__ import annotations

import numpy as np

from transcribe_gateway.audio.buffer import AudioBuffer


def make(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int16)


def test_slice_spans_chunks_and_clips_to_what_is_held() -> None:
    buf = AudioBuffer()
    for i in range(5):
        buf.append(make(10, 10 * i))
    assert buf.start == 0 and buf.end == 50
    assert np.array_equal(buf.slice(5, 27), make(22, 5))
    assert np.array_equal(buf.slice(-10, 3), make(3))
    assert np.array_equal(buf.slice(45, 100), make(5, 45))
    assert len(buf.slice(30, 30)) == 0


def test_discard_before_keeps_indexes_stable() -> None:
    buf = AudioBuffer()
    for i in range(5):
        buf.append(make(10, 10 * i))
    buf.discard_before(23)
    assert buf.start == 23
    assert np.array_equal(buf.slice(0, 30), make(7, 23))
    buf.discard_before(10)  # never un-discards
    assert buf.start == 23
    buf.discard_before(1000)  # clipped to the end
    assert buf.start == buf.end == 50
    buf.append(make(4, 50))
    assert np.array_equal(buf.slice(0, 100), make(4, 50))


def test_slice_is_a_copy() -> None:
    buf = AudioBuffer()
    chunk = make(10)
    buf.append(chunk)
    out = buf.slice(0, 10)
    out[:] = 0
    assert np.array_equal(buf.slice(0, 10), make(10))


def test_empty_chunks_and_clear() -> None:
    buf = AudioBuffer()
    buf.append(make(0))
    assert buf.end == 0
    buf.append(make(8))
    buf.clear()
    assert buf.start == buf.end == 8 and len(buf.slice(0, 8)) == 0
