"""Wire audio decoding (PROTOCOL.md "session.input_audio_format", "session.sample_rate"):
G.711 tables, pcm16, streaming resampling and reading audio files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from transcribe_gateway.audio.decode import (
    ALAW_TABLE,
    BYTES_PER_SAMPLE,
    MULAW_TABLE,
    Samples,
    decode_audio,
    encode_alaw,
    encode_mulaw,
)
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.audio.resample import Resampler, resample

Encoder = Callable[[Samples], bytes]
AUDIO = Path(__file__).resolve().parents[3] / "shared" / "audio"


def shared(name: str) -> Path:
    """A file of the shared test audio; missing audio is a failure, never a skip."""
    path = AUDIO / name
    assert path.is_file(), f"{path} is missing: the tests need ../shared/audio beside the repo"
    return path


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 12000.0) -> Samples:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_hz(samples: Samples, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def level_at(samples: Samples, rate: int, freq: float) -> float:
    """Spectral magnitude near ``freq`` relative to the strongest component."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    hz = np.fft.rfftfreq(len(samples), 1 / rate)
    near = np.abs(hz - freq) < 20
    return float(spectrum[near].max() / spectrum.max())


def rel_error(got: Samples, want: Samples) -> float:
    err = got.astype(np.float64) - want.astype(np.float64)
    return float(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(want.astype(np.float64) ** 2)))


# ------------------------------------------------------------------ G.711


def itu_mulaw(code: int) -> int:
    """G.711 mu-law decoding, written from the standard rather than from the module.

    The code word is transmitted inverted; after inversion bit 7 set means
    negative, bits 6-4 are the segment e and bits 3-0 the step m.  The 14-bit
    magnitude is (2m + 33) * 2^e - 33; on a 16-bit scale that is 4x.
    """
    c = ~code & 0xFF
    e, m = (c >> 4) & 7, c & 0x0F
    magnitude = 4 * (((2 * m + 33) << e) - 33)
    return -magnitude if c & 0x80 else magnitude


def itu_alaw(code: int) -> int:
    """G.711 A-law decoding: even bits inverted; bit 7 set means positive.

    The 13-bit magnitude is 2m + 1 in segment 0 and (2m + 33) * 2^(e-1) above;
    on a 16-bit scale that is 8x.
    """
    c = code ^ 0x55
    e, m = (c >> 4) & 7, c & 0x0F
    magnitude = 8 * (2 * m + 1) if e == 0 else 8 * ((2 * m + 33) << (e - 1))
    return magnitude if c & 0x80 else -magnitude


class TestG711Tables:
    @pytest.mark.parametrize(
        ("code", "value"),
        [
            (0xFF, 0),
            (0x7F, 0),  # "negative zero"
            (0x00, -32124),
            (0x80, 32124),
            (0xFE, 8),
            (0x7E, -8),
            (0xF0, 120),  # top of segment 0
            (0xEF, 132),  # bottom of segment 1
            (0x8F, 16764),
            (0x0F, -16764),
        ],
    )
    def test_server_decodes_mulaw_known_values(self, code: int, value: int) -> None:
        assert itu_mulaw(code) == value
        assert int(MULAW_TABLE[code]) == value
        assert decode_audio(bytes([code]), "mulaw").tolist() == [value]

    @pytest.mark.parametrize(
        ("code", "value"),
        [
            (0xD5, 8),
            (0x55, -8),
            (0x2A, -32256),
            (0xAA, 32256),
            (0xD4, 24),
            (0xC5, 264),  # bottom of segment 1
            (0xF5, 528),  # bottom of segment 2
            (0xA5, 16896),  # bottom of segment 7
            (0x25, -16896),
        ],
    )
    def test_server_decodes_alaw_known_values(self, code: int, value: int) -> None:
        assert itu_alaw(code) == value
        assert int(ALAW_TABLE[code]) == value
        assert decode_audio(bytes([code]), "alaw").tolist() == [value]

    def test_server_decodes_every_mulaw_code_per_g711(self) -> None:
        assert MULAW_TABLE.tolist() == [itu_mulaw(c) for c in range(256)]
        assert MULAW_TABLE.dtype == np.int16

    def test_server_decodes_every_alaw_code_per_g711(self) -> None:
        assert ALAW_TABLE.tolist() == [itu_alaw(c) for c in range(256)]
        assert ALAW_TABLE.dtype == np.int16

    @pytest.mark.parametrize("table", [MULAW_TABLE, ALAW_TABLE], ids=["mulaw", "alaw"])
    def test_server_decodes_sign_bit_symmetrically(self, table: Samples) -> None:
        # Flipping the sign bit negates the value.
        assert all(int(table[c]) == -int(table[c ^ 0x80]) for c in range(256))

    @pytest.mark.parametrize("table", [MULAW_TABLE, ALAW_TABLE], ids=["mulaw", "alaw"])
    def test_server_decodes_128_magnitudes(self, table: Samples) -> None:
        positive = sorted({int(v) for v in table if v >= 0})
        assert len(positive) == 128


class TestG711RoundTrip:
    @pytest.mark.parametrize(("fmt", "encode"), [("mulaw", encode_mulaw), ("alaw", encode_alaw)])
    @pytest.mark.parametrize("amp", [20000.0, 1000.0])
    def test_client_encodes_g711_with_small_error(
        self, fmt: str, encode: Encoder, amp: float
    ) -> None:
        x = tone(440, 8000, amp=amp)
        data = encode(x)
        assert isinstance(data, bytes) and len(data) == len(x)
        y = decode_audio(data, fmt)
        # G.711 keeps about 38 dB SNR over its range: ~1.3% RMS error.
        assert rel_error(y, x) < 0.03

    @pytest.mark.parametrize(
        ("fmt", "encode", "table"),
        [("mulaw", encode_mulaw, MULAW_TABLE), ("alaw", encode_alaw, ALAW_TABLE)],
    )
    def test_client_encodes_table_values_exactly(
        self, fmt: str, encode: Encoder, table: Samples
    ) -> None:
        assert decode_audio(encode(table), fmt).tolist() == table.tolist()

    @pytest.mark.parametrize(("fmt", "encode"), [("mulaw", encode_mulaw), ("alaw", encode_alaw)])
    def test_client_encodes_extremes_saturated(self, fmt: str, encode: Encoder) -> None:
        x = np.array([-32768, 32767, 0], dtype=np.int16)
        y = decode_audio(encode(x), fmt).tolist()
        top = 32124 if fmt == "mulaw" else 32256
        assert y[0] == -top and y[1] == top and abs(y[2]) <= 8


class TestPcm16:
    def test_server_decodes_little_endian(self) -> None:
        data = b"\x01\x00\xff\x7f\x00\x80\xff\xff\x34\x12"
        samples = decode_audio(data, "pcm16")
        assert samples.tolist() == [1, 32767, -32768, -1, 0x1234]
        assert samples.dtype == np.int16

    def test_server_decodes_empty_chunk(self) -> None:
        for fmt in ("pcm16", "mulaw", "alaw"):
            assert decode_audio(b"", fmt).tolist() == []

    @pytest.mark.parametrize("size", [1, 3, 641])
    def test_server_rejects_odd_length(self, size: int) -> None:
        with pytest.raises(ValueError, match="odd"):
            decode_audio(b"\x00" * size, "pcm16")

    @pytest.mark.parametrize("fmt", ["mulaw", "alaw"])
    def test_server_decodes_odd_length_g711(self, fmt: str) -> None:
        assert len(decode_audio(b"\xd5" * 3, fmt)) == 3

    @pytest.mark.parametrize("fmt", ["PCM16", "ulaw", "opus", ""])
    def test_server_rejects_unknown_format(self, fmt: str) -> None:
        with pytest.raises(ValueError):
            decode_audio(b"\x00\x00", fmt)

    def test_server_knows_bytes_per_sample(self) -> None:
        assert BYTES_PER_SAMPLE == {"pcm16": 2, "mulaw": 1, "alaw": 1}


# ------------------------------------------------------------- resampling


def stream(samples: Samples, in_rate: int, out_rate: int, chunk_ms: int = 20) -> Samples:
    resampler = Resampler(in_rate, out_rate)
    step = in_rate * chunk_ms // 1000
    parts = [resampler.push(samples[i : i + step]) for i in range(0, len(samples), step)]
    parts.append(resampler.flush())
    return np.concatenate(parts)


class TestResample:
    @pytest.mark.parametrize("in_rate", [8000, 11025, 22050, 44100, 48000])
    def test_server_resamples_stream_like_one_shot(self, in_rate: int) -> None:
        x = tone(440, in_rate, seconds=1.0)
        whole = resample(x, in_rate, 16000)
        pieces = stream(x, in_rate, 16000)
        assert pieces.dtype == np.int16 and whole.dtype == np.int16
        assert len(whole) == 16000
        assert abs(len(pieces) - len(whole)) <= 1
        n = min(len(pieces), len(whole))
        diff = np.abs(pieces[:n].astype(np.int32) - whole[:n].astype(np.int32))
        assert int(diff.max()) <= 4  # a few LSB of rounding, no clicks at chunk edges

    @pytest.mark.parametrize("in_rate", [8000, 48000])
    def test_server_resamples_keeping_the_tone(self, in_rate: int) -> None:
        out = stream(tone(440, in_rate, seconds=1.0), in_rate, 16000)
        assert abs(peak_hz(out, 16000) - 440) <= 2
        # Same loudness after resampling (ignore the filter's edges).
        rms = np.sqrt(np.mean(out[800:-800].astype(np.float64) ** 2))
        assert rms == pytest.approx(12000 / np.sqrt(2), rel=0.02)

    def test_server_upsamples_without_image(self) -> None:
        # 8 kHz -> 16 kHz: a naive upsampler mirrors 440 Hz to 8000 - 440 Hz.
        out = stream(tone(440, 8000, seconds=1.0), 8000, 16000)
        assert level_at(out, 16000, 7560) < 0.001

    def test_server_downsamples_without_alias(self) -> None:
        # 48 kHz -> 16 kHz: 10 kHz is above the new Nyquist and must not alias to 6 kHz.
        x = (tone(440, 48000).astype(np.int32) + tone(10000, 48000)).astype(np.int16)
        out = stream(x, 48000, 16000)
        assert abs(peak_hz(out, 16000) - 440) <= 2
        assert level_at(out, 16000, 6000) < 0.001

    @pytest.mark.parametrize("out_rate", [16000, 24000])
    def test_server_upsamples_phone_audio_without_holding_it_back(self, out_rate: int) -> None:
        # soxr's stream gives its output in blocks: of a phone line's 20 ms chunks
        # at 8 kHz, only one in five came out, and the engine (its VAD, the end
        # of an utterance) heard the audio 63 ms late on average, 115 ms at worst.
        resampler = Resampler(8000, out_rate)
        x = read_audio(shared("jfk.flac"), rate=8000)
        given = taken = 0
        for i in range(0, len(x) - 160, 160):
            given += 160
            taken += len(resampler.push(x[i : i + 160]))
            assert given / 8000 - taken / out_rate < 0.013  # the filter's own delay
        tail = resampler.flush()
        assert taken + len(tail) == given * out_rate // 8000

    def test_server_passes_through_same_rate(self) -> None:
        x = tone(440, 16000)
        assert Resampler(16000, 16000).push(x) is x
        assert len(Resampler(16000, 16000).flush()) == 0
        assert resample(x, 16000, 16000) is x

    def test_server_resamples_any_chunk_size_to_the_same_samples(self) -> None:
        x = read_audio(shared("jfk.flac"), rate=8000)
        assert np.array_equal(stream(x, 8000, 16000, 20), stream(x, 8000, 16000, 100))

    def test_server_resamples_the_same_audio_the_same_every_time(self) -> None:
        # soxr's int16 output dithers with a fresh seed per stream: two phone
        # sessions carrying the same audio heard different samples (and now
        # and then a different word).
        x = read_audio(shared("jfk.flac"), rate=8000)
        first = stream(x, 8000, 16000)
        assert all(np.array_equal(first, stream(x, 8000, 16000)) for _ in range(3))

    @pytest.mark.parametrize("in_rate", [8000, 48000])
    def test_server_clips_the_filters_overshoot_instead_of_wrapping(self, in_rate: int) -> None:
        # A full-scale square wave rings ~27% past full scale through the filter.
        t = np.arange(in_rate) / in_rate
        square = np.where(np.sin(2 * np.pi * 100 * t) >= 0, 32767, -32767).astype(np.int16)
        exact = soxr.resample(square.astype(np.float64), in_rate, 16000)
        assert np.abs(exact).max() > 38000
        out = stream(square, in_rate, 16000)[: len(exact)]
        over = np.abs(exact) > 34000  # clearly past full scale in any good filter
        assert np.array_equal(out[over], np.where(exact[over] > 0, 32767, -32768))


# ------------------------------------------------------------------ files


class TestReadAudio:
    def test_client_reads_flac_at_44k_as_16k_mono(self) -> None:
        path = shared("jfk.flac")
        info = soundfile.info(str(path))
        assert info.samplerate == 44100
        samples = read_audio(path)
        assert samples.dtype == np.int16 and samples.ndim == 1
        expected = round(info.frames * 16000 / 44100)
        assert abs(len(samples) - expected) <= 1
        assert len(samples) / 16000 == pytest.approx(11.0, abs=0.05)
        assert np.abs(samples).max() > 5000  # speech, not silence

    def test_client_reads_flac_at_other_rate(self) -> None:
        samples = read_audio(shared("jfk.flac"), rate=8000)
        assert len(samples) / 8000 == pytest.approx(11.0, abs=0.05)

    def test_client_reads_raw_pcm16(self) -> None:
        path = shared("goforward.raw")
        samples = read_audio(path)
        raw = np.frombuffer(path.read_bytes(), dtype="<i2")
        assert len(samples) == path.stat().st_size // 2
        assert np.array_equal(samples, raw)

    def test_client_reads_raw_pcm16_at_given_rate(self) -> None:
        path = shared("goforward.raw")
        samples = read_audio(path, raw_rate=8000)
        assert abs(len(samples) - 2 * path.stat().st_size // 2) <= 1

    def test_client_downmixes_stereo(self) -> None:
        path = shared("stereo_diarization.wav")
        info = soundfile.info(str(path))
        assert (info.channels, info.samplerate) == (2, 16000)
        stereo, _ = soundfile.read(str(path), dtype="int16")
        samples = read_audio(path)
        assert samples.ndim == 1 and len(samples) == info.frames
        mean = stereo.astype(np.float64).mean(axis=1)
        assert np.abs(samples - mean).max() <= 1
        # Both speakers are present in the mix.
        left, right = stereo[:, 0].astype(np.float64), stereo[:, 1].astype(np.float64)
        assert np.corrcoef(samples, left)[0, 1] > 0.3
        assert np.corrcoef(samples, right)[0, 1] > 0.3

    @pytest.mark.parametrize(
        "name", ["cards-001.wav", "sense_and_sensibility_01_austen_64kb-0880.wav"]
    )
    def test_client_reads_wav(self, name: str) -> None:
        path = shared(name)
        info = soundfile.info(str(path))
        samples = read_audio(path)
        assert abs(len(samples) - round(info.frames * 16000 / info.samplerate)) <= 1

    @pytest.mark.parametrize("name", ["missing.wav", "missing.flac"])
    def test_client_rejects_missing_file(self, tmp_path: Path, name: str) -> None:
        with pytest.raises(FileNotFoundError):
            read_audio(tmp_path / name)

    def test_client_rejects_missing_raw_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            read_audio(tmp_path / "missing.raw")

    @pytest.mark.parametrize("name", ["garbage.wav", "garbage.flac", "garbage.mp3", "garbage.bin"])
    def test_client_rejects_garbage(self, tmp_path: Path, name: str) -> None:
        path = tmp_path / name
        path.write_bytes(np.random.default_rng(7).integers(0, 256, 4000, np.uint8).tobytes())
        with pytest.raises(ValueError, match="cannot decode"):
            read_audio(path)

    def test_client_rejects_empty_file(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.wav"
        path.write_bytes(b"")
        with pytest.raises(ValueError):
            read_audio(path)

    def test_client_rejects_directory(self, tmp_path: Path) -> None:
        with pytest.raises(OSError):
            read_audio(tmp_path)
