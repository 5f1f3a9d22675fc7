"""Reading audio files (the CLI's and SDK's ``stream_file``): float and lossy codecs are
scaled and clipped like integer ones, and a file that cannot be opened is an OSError,
not a decoding error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.conftest import SHARED_AUDIO
from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.files import read_audio


def shared(name: str) -> Path:
    """A file of the shared test audio; missing audio is a failure, never a skip."""
    path = SHARED_AUDIO / name
    assert path.is_file(), f"{path} is missing: the tests need ../shared/audio beside the repo"
    return path


def libsndfile_int16(path: Path) -> Samples:
    """What read_audio gave before for every format: libsndfile's int16, mean-downmixed."""
    audio, _ = soundfile.read(path, dtype="int16", always_2d=True)
    mono = audio.mean(axis=1).astype(np.int16) if audio.shape[1] > 1 else audio[:, 0]
    return np.asarray(mono, np.int16)


def square(rate: int, seconds: float = 1.0) -> np.ndarray:
    """Near full scale: lossy codecs' decoders overshoot ±1.0 on every edge."""
    t = np.arange(int(rate * seconds)) / rate
    return 0.99 * np.sign(np.sin(2 * np.pi * 200 * t))


# ------------------------------------------------------------------ float WAV / AIFF


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix"),
    [
        ("WAV", "FLOAT", ".wav"),
        ("WAVEX", "FLOAT", ".wav"),
        ("WAV", "DOUBLE", ".wav"),
        ("AIFF", "FLOAT", ".aiff"),
    ],
)
@pytest.mark.parametrize("name", ["cards-001.wav", "stereo_diarization.wav"])
def test_float_file_reads_like_its_pcm16_source(
    tmp_path: Path, name: str, fmt: str, subtype: str, suffix: str
) -> None:
    source = shared(name)
    assert soundfile.info(str(source)).subtype == "PCM_16"
    pcm16, rate = soundfile.read(source, dtype="int16")
    path = tmp_path / f"speech{suffix}"
    # x / 32768: how sox, ffmpeg and libsndfile turn 16-bit samples into floats.
    soundfile.write(path, pcm16 / 32768, rate, format=fmt, subtype=subtype)

    samples = read_audio(path)

    want = read_audio(source)
    assert samples.dtype == np.int16 and len(samples) == len(want)
    # Before: libsndfile's unscaled float -> int16 made speech a peak of ±2.
    assert int(np.abs(samples.astype(np.int32) - want).max()) <= 1
    assert int(np.abs(samples.astype(np.int32)).max()) > 5000


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_float_wav_out_of_range_values_are_clipped_and_nan_silenced(
    tmp_path: Path, subtype: str
) -> None:
    values = np.array([0.5, -0.5, 1.5, -1.5, np.inf, -np.inf, np.nan, 1.0, -1.0, 0.0])
    path = tmp_path / "odd.wav"
    soundfile.write(path, values, 16000, subtype=subtype)

    samples = read_audio(path)

    want = [16384, -16384, 32767, -32768, 32767, -32768, 0, 32767, -32768, 0]
    assert samples.tolist() == want


# ------------------------------------------------------------------ loud lossy


@pytest.mark.parametrize(("subtype", "rate"), [("VORBIS", 16000), ("OPUS", 48000)])
def test_loud_ogg_clips_instead_of_wrapping(tmp_path: Path, subtype: str, rate: int) -> None:
    path = tmp_path / "loud.ogg"
    soundfile.write(path, square(rate), rate, format="OGG", subtype=subtype)
    decoded, _ = soundfile.read(path, dtype="float32")
    assert np.abs(decoded).max() > 1.0  # the overshoot this is about

    samples = read_audio(path, rate=rate).astype(np.int32)

    clipped = np.rint(np.clip(decoded, -1.0, 1.0) * 32767).astype(np.int32)
    assert len(samples) == len(clipped)
    loud = np.abs(decoded) > 0.5
    # Before: +1.00003 came out as -32768, a full-scale click on every edge.
    assert np.array_equal(np.sign(samples[loud]), np.sign(decoded[loud]).astype(np.int32))
    assert int(np.abs(samples - clipped).max()) <= 1


def test_loud_speech_in_ogg_keeps_its_sign(tmp_path: Path) -> None:
    # Real speech peak-normalized to 0 dBFS, as podcast tools export it.
    speech, rate = soundfile.read(shared("jfk.flac"), dtype="float32")
    mono = speech.mean(axis=1)
    path = tmp_path / "speech.ogg"
    soundfile.write(path, mono / np.abs(mono).max(), rate, format="OGG", subtype="VORBIS")
    decoded, _ = soundfile.read(path, dtype="float32")

    samples = read_audio(path, rate=rate).astype(np.int32)

    clipped = np.rint(np.clip(decoded, -1.0, 1.0) * 32767).astype(np.int32)
    assert int(np.abs(samples - clipped).max()) <= 1


# ------------------------------------------------------------------ unchanged formats


def test_pcm16_wav_round_trips_bit_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pcm = np.concatenate(
        [np.array([-32768, 32767, 0, -1, 1], np.int16), rng.integers(-32768, 32768, 16000)]
    ).astype(np.int16)
    path = tmp_path / "pcm16.wav"
    soundfile.write(path, pcm, 16000, subtype="PCM_16")

    assert np.array_equal(read_audio(path), pcm)


INTEGER_AND_MP3 = [
    ("WAV", "PCM_16", ".wav"),
    ("WAV", "PCM_24", ".wav"),
    ("WAV", "PCM_32", ".wav"),
    ("WAV", "PCM_U8", ".wav"),
    ("WAV", "ULAW", ".wav"),
    ("FLAC", "PCM_16", ".flac"),
    ("FLAC", "PCM_24", ".flac"),
    ("MP3", "MPEG_LAYER_III", ".mp3"),
]


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix"),
    [*INTEGER_AND_MP3, ("OGG", "VORBIS", ".ogg"), ("OGG", "OPUS", ".opus")],
)
def test_speech_in_other_formats_reads_as_before(
    tmp_path: Path, fmt: str, subtype: str, suffix: str
) -> None:
    # Half scale: nothing overshoots, so Vorbis/Opus keep libsndfile's int16 too.
    speech, _ = soundfile.read(shared("cards-001.wav"), dtype="float32")
    path = tmp_path / f"speech{suffix}"
    soundfile.write(path, 0.5 * speech / np.abs(speech).max(), 16000, format=fmt, subtype=subtype)

    assert np.array_equal(read_audio(path), libsndfile_int16(path))


@pytest.mark.parametrize(("fmt", "subtype", "suffix"), INTEGER_AND_MP3)
def test_loud_stereo_in_integer_formats_and_mp3_reads_as_before(
    tmp_path: Path, fmt: str, subtype: str, suffix: str
) -> None:
    # libsndfile clips these right itself (MP3's overshoot too), so they keep its int16.
    loud = np.stack([square(16000), -0.5 * square(16000)], axis=1)
    path = tmp_path / f"loud{suffix}"
    soundfile.write(path, loud, 16000, format=fmt, subtype=subtype)

    assert np.array_equal(read_audio(path), libsndfile_int16(path))


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", ["missing.wav", "missing.flac", "missing.raw"])
def test_missing_file_is_file_not_found(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match="No such file") as caught:
        read_audio(path)
    assert caught.value.filename == str(path)  # the message names it, not "System error."


def test_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        read_audio(tmp_path)


@pytest.mark.parametrize("name", ["garbage.wav", "empty.flac"])
def test_undecodable_file_is_a_value_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not audio at all" if name.startswith("garbage") else b"")
    with pytest.raises(ValueError, match="cannot decode") as caught:
        read_audio(path)
    assert not isinstance(caught.value, OSError)
