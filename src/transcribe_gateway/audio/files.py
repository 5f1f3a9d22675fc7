"""Read common audio files (wav, flac, mp3, ogg, raw pcm16) as mono int16 at a chosen rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.resample import resample


def read_audio(path: str | Path, *, rate: int = 16000, raw_rate: int | None = None) -> Samples:
    """Load an audio file, downmix to mono and resample.

    Args:
        path: a file soundfile/libsndfile can read (wav, flac, mp3, ogg...), or a
            headerless little-endian pcm16 mono file (``.raw``/``.pcm`` or when
            ``raw_rate`` is given).
        rate: the sample rate wanted.
        raw_rate: the sample rate of a raw pcm16 file (default 16000).

    Raises:
        ValueError: the file is missing, unreadable or cannot be decoded.
    """
    path = Path(path)
    if raw_rate is not None or path.suffix.lower() in {".raw", ".pcm", ".s16le"}:
        try:
            data = np.fromfile(path, dtype="<i2").astype(np.int16)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return resample(data, raw_rate or 16000, rate)
    try:
        audio, file_rate = soundfile.read(path, dtype="int16", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from exc
    mono = audio.mean(axis=1).astype(np.int16) if audio.shape[1] > 1 else audio[:, 0]
    return resample(np.ascontiguousarray(mono), int(file_rate), rate)
