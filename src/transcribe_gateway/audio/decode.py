"""Decode the wire audio formats (pcm16, G.711 mu-law and A-law) to int16 samples.

G.711 is decoded with 256-entry lookup tables built once with numpy: ``audioop``
is gone from Python 3.13 and no maintained library does just this.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.int16]
"""Mono signed 16-bit samples."""

BYTES_PER_SAMPLE: Final = {"pcm16": 2, "mulaw": 1, "alaw": 1}


def _mulaw_table() -> Samples:
    # ITU-T G.711 mu-law expansion: complement, then sign/exponent/mantissa.
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> Samples:
    # ITU-T G.711 A-law expansion: even bits inverted, then segment/mantissa.
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


_PCM16: Final = np.dtype("<i2")
"""Little-endian int16: native on little-endian hosts, where no conversion is made."""
MULAW_TABLE: Final = _mulaw_table()
ALAW_TABLE: Final = _alaw_table()


def decode_audio(data: bytes, audio_format: str) -> Samples:
    """Turn one chunk of wire audio into int16 samples.

    Args:
        data: the decoded bytes of an ``audio.append`` chunk.
        audio_format: ``pcm16`` (little-endian), ``mulaw`` or ``alaw``.

    Raises:
        ValueError: an unknown format or a pcm16 chunk of odd length.
    """
    if audio_format == "pcm16":
        if len(data) % 2:
            raise ValueError("pcm16 chunk has an odd number of bytes")
        samples = np.frombuffer(data, dtype=_PCM16)
        return samples if _PCM16.isnative else samples.astype(np.int16)
    codes = np.frombuffer(data, dtype=np.uint8)
    if audio_format == "mulaw":
        return MULAW_TABLE[codes]
    if audio_format == "alaw":
        return ALAW_TABLE[codes]
    raise ValueError(f"unknown audio format {audio_format!r}")


def encode_mulaw(samples: Samples) -> bytes:
    """Compress int16 samples to G.711 mu-law (for clients and tests that simulate phones)."""
    return _encode_by_search(samples, MULAW_TABLE)


def encode_alaw(samples: Samples) -> bytes:
    """Compress int16 samples to G.711 A-law."""
    return _encode_by_search(samples, ALAW_TABLE)


def _encode_by_search(samples: Samples, table: Samples) -> bytes:
    # Nearest code by value: sort the 256 decoded levels once, binary-search each sample.
    order = np.argsort(table, kind="stable")
    levels = table[order].astype(np.int32)
    x = samples.astype(np.int32)
    idx = np.clip(np.searchsorted(levels, x), 1, 255)
    left, right = levels[idx - 1], levels[idx]
    idx = np.where(np.abs(x - left) <= np.abs(right - x), idx - 1, idx)
    return order[idx].astype(np.uint8).tobytes()
