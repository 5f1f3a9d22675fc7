"""Read common audio files (wav, flac, mp3, ogg, raw pcm16) as mono int16 at a chosen rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.resample import resample

RAW_SUFFIXES = frozenset({".raw", ".pcm", ".s16le"})
"""Suffixes of headerless pcm16 files (their rate is the caller's to say)."""

_FLOAT_SCALES = {"FLOAT": 32768.0, "DOUBLE": 32768.0, "VORBIS": 32767.0, "OPUS": 32767.0}
"""Codecs whose samples are floats, read as float and scaled here: libsndfile's own
int16 conversion does not scale float WAV/AIFF (speech becomes ±2, silence) and wraps
Vorbis/Opus overshoot past ±1.0 to the opposite rail. 32768 inverts the usual
int16 -> float (x / 32768), so a 16-bit source saved as float comes back bit-exactly;
32767 is what libsndfile used for Vorbis/Opus, so only their overshoot changes.
Every other subtype (integer PCM, G.711, ADPCM, FLAC, MP3, ...) is read as int16 by
libsndfile, exactly as before."""


def _float_to_int16(audio: npt.NDArray[np.float32], scale: float) -> npt.NDArray[np.int16]:
    # NaN/inf would be undefined in the int cast; past full scale clips, never wraps.
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    scaled = np.rint(np.clip(audio, -1.0, 1.0) * np.float32(scale))
    samples: npt.NDArray[np.int16] = np.clip(scaled, -32768, 32767).astype(np.int16)
    return samples


def read_audio(path: str | Path, *, rate: int = 16000, raw_rate: int | None = None) -> Samples:
    """Load an audio file, downmix to mono and resample.

    Args:
        path: a file soundfile/libsndfile can read (wav, flac, mp3, ogg...), or a
            headerless little-endian pcm16 mono file (:data:`RAW_SUFFIXES`, or
            any file when ``raw_rate`` is given).
        rate: the sample rate wanted.
        raw_rate: the sample rate of a raw pcm16 file (default 16000).

    Raises:
        OSError: ``path`` cannot be opened for reading: missing
            (``FileNotFoundError``), a directory (``IsADirectoryError``), no
            permission (``PermissionError``)...
        ValueError: the file opens but its content cannot be decoded.
    """
    path = Path(path)
    # Open it first: an unreadable path is then an OSError naming the path and the
    # reason, where libsndfile says only "System error.".
    with open(path, "rb") as file:
        if raw_rate is not None or path.suffix.lower() in RAW_SUFFIXES:
            data = np.fromfile(file, dtype="<i2").astype(np.int16)
            return resample(data, raw_rate or 16000, rate)
    try:
        scale = _FLOAT_SCALES.get(soundfile.info(str(path)).subtype)
        # soundfile.read, as before: its seek(0) gives a few MP3 samples 1 LSB apart
        # from a bare SoundFile.read.
        audio, file_rate = soundfile.read(
            path, dtype="int16" if scale is None else "float32", always_2d=True
        )
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise ValueError(f"cannot decode {path}: {exc}") from exc
    if scale is not None:
        audio = _float_to_int16(audio, scale)
    mono = audio.mean(axis=1).astype(np.int16) if audio.shape[1] > 1 else audio[:, 0]
    return resample(np.ascontiguousarray(mono), int(file_rate), rate)
