"""Real speech through the real server: word error rates, streaming vs batch, and concurrency.

Streaming here means the gateway path (chunks, resampling, VAD segmentation,
per-utterance decoding); the batch reference is the same model decoding each
whole file at once.  Audio is sent faster than real time: segmentation and
finals do not depend on pacing (partials do, and are measured in bench/).
Bounds were measured on this machine (see BENCHMARKS.md) with a margin.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import GatewayProcess
from tests.server.wsutil import collect, finals, open_session, send_audio
from tests.textnorm import LIBRIVOX, corpus_wer, normalize, references
from transcribe_gateway.audio.decode import decode_audio, encode_mulaw
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.audio.resample import resample

REFS = references()
TRAIL = np.zeros(16000, dtype=np.int16)  # 1 s of silence after each file


def load(shared_audio: Path, name: str) -> np.ndarray:
    return np.concatenate([read_audio(shared_audio / name), TRAIL])


def phone(samples: np.ndarray) -> np.ndarray:
    """What a phone line carries: 8 kHz G.711 mu-law, decoded back to int16 at 8 kHz."""
    return decode_audio(encode_mulaw(resample(samples, 16000, 8000)), "mulaw")


async def transcribe_stream(
    url: str,
    samples: np.ndarray,
    *,
    model: str,
    rate: int = 16000,
    fmt: str = "pcm16",
    realtime: float = 0.0,
) -> str:
    # Files are sent faster than real time: a busy engine may ask us to retry.
    ws, updated = await open_session(
        url, retry_busy=True, model=model, sample_rate=rate, input_audio_format=fmt
    )
    assert updated["session"]["sample_rate"] == rate
    if fmt == "mulaw":
        wire = resample(samples, 16000, 8000) if rate == 8000 else samples
    else:
        wire = samples if rate == 16000 else resample(samples, 16000, rate)
    await send_audio(ws, wire, rate=rate, fmt=fmt, realtime=realtime)
    await ws.send(json.dumps({"type": "session.close"}))
    messages = await collect(ws, 180)
    assert messages[-1]["type"] == "session.closed"
    assert not [m for m in messages if m["type"] == "error"], messages
    return finals(messages)


@pytest.fixture(scope="module")
def batch_whisper(shared_audio: Path) -> dict[str, tuple[str, str]]:
    """Batch transcripts with the same model: name -> (pcm16 16 kHz, mu-law 8 kHz)."""
    from transcribe_gateway.providers.whisper_engine import WhisperEngine, resolve_whisper_model

    engine = WhisperEngine(
        "whisper-tiny.en", resolve_whisper_model("whisper-tiny.en", {}, False), 1
    )
    out = {}
    for name in REFS:
        clean = load(shared_audio, name)
        out[name] = (
            engine.transcribe(clean, final=True).text,
            engine.transcribe(resample(phone(clean), 8000, 16000), final=True).text,
        )
    return out


async def stream_all(
    url: str, shared_audio: Path, *, at_once: int = 12, **kwargs: Any
) -> dict[str, str]:
    names = list(REFS)
    gate = asyncio.Semaphore(at_once)

    async def one(name: str) -> str:
        async with gate:
            return await transcribe_stream(url, load(shared_audio, name), **kwargs)

    texts = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, texts, strict=True))


def wer(texts: dict[str, str], names: list[str]) -> float:
    return corpus_wer([(REFS[n], texts[n]) for n in names])


class TestWhisperAccuracy:
    async def test_streaming_pcm16_matches_batch(
        self, gateway: GatewayProcess, shared_audio: Path, batch_whisper: dict[str, tuple[str, str]]
    ) -> None:
        streamed = await stream_all(gateway.url, shared_audio, model="whisper-tiny.en")
        batch = {n: t[0] for n, t in batch_whisper.items()}
        librivox_stream, librivox_batch = wer(streamed, LIBRIVOX), wer(batch, LIBRIVOX)
        print(f"whisper pcm16 librivox: stream {librivox_stream:.3f} batch {librivox_batch:.3f}")
        print(
            f"whisper pcm16 all: stream {wer(streamed, list(REFS)):.3f} batch {wer(batch, list(REFS)):.3f}"
        )
        assert librivox_stream <= 0.10
        assert librivox_stream <= librivox_batch * 1.05 + 1e-9
        # Files that are one utterance each decode exactly as in batch.
        single = [n for n in REFS if n != "jfk.flac"]
        assert wer(streamed, single) <= wer(batch, single) * 1.05 + 1e-9
        # jfk.flac is cut into 4 utterances at its pauses; Whisper loses the right-hand
        # context of the first ("and so my" -> "and so am i"): measured 2 errors in 22.
        assert wer(streamed, ["jfk.flac"]) <= 3 / 22

    async def test_streaming_mulaw_8k_matches_batch(
        self, gateway: GatewayProcess, shared_audio: Path, batch_whisper: dict[str, tuple[str, str]]
    ) -> None:
        streamed = await stream_all(
            gateway.url, shared_audio, model="whisper-tiny.en", rate=8000, fmt="mulaw"
        )
        batch = {n: t[1] for n, t in batch_whisper.items()}
        s, b = wer(streamed, LIBRIVOX), wer(batch, LIBRIVOX)
        print(f"whisper mulaw-8k librivox: stream {s:.3f} batch {b:.3f}")
        print(
            f"whisper mulaw-8k all: stream {wer(streamed, list(REFS)):.3f} batch {wer(batch, list(REFS)):.3f}"
        )
        assert s <= 0.15
        assert s <= b * 1.05 + 1e-9
        # Over all files (jfk cut into utterances, short commands) measured 0.085
        # (0.110 before the VAD heard phone audio widened: audio/vad.py NarrowbandVad).
        assert wer(streamed, list(REFS)) <= 0.10
        # cards-005 starts at once, quietly ("eight of spades"): heard at 8 kHz, not lost.
        assert normalize(streamed["cards-005.wav"]).startswith("eight of spades")

    async def test_other_sample_rates_are_resampled(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        name = "sense_and_sensibility_01_austen_64kb-0930.wav"
        for rate in (8000, 22050, 44100, 48000):
            text = await transcribe_stream(
                gateway.url, load(shared_audio, name), model="whisper-tiny.en", rate=rate
            )
            assert corpus_wer([(REFS[name], text)]) <= 0.15, (rate, text)

    async def test_alaw_is_decoded(self, gateway: GatewayProcess, shared_audio: Path) -> None:
        samples = resample(load(shared_audio, "goforward.raw"), 16000, 8000)
        ws, _ = await open_session(gateway.url, sample_rate=8000, input_audio_format="alaw")
        await send_audio(ws, samples, rate=8000, fmt="alaw")
        await ws.send(json.dumps({"type": "session.close"}))
        assert corpus_wer([(REFS["goforward.raw"], finals(await collect(ws, 60)))]) == 0


@pytest.fixture(scope="module")
def batch_sphinx(shared_audio: Path) -> dict[str, tuple[str, str]]:
    """Batch pocketsphinx (each whole file one utterance): name -> (pcm16 16 kHz, mu-law 8 kHz)."""
    from pocketsphinx import Decoder

    # full_utt=True normalizes each file with its own cepstral mean, so one decoder serves all.
    decoder = Decoder(fwdflat=False, bestpath=False, loglevel="FATAL")

    def decode(samples: np.ndarray) -> str:
        decoder.start_utt()
        decoder.process_raw(samples.astype("<i2").tobytes(), False, True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp else ""

    out = {}
    for name in REFS:
        clean = load(shared_audio, name)
        out[name] = (decode(clean), decode(resample(phone(clean), 8000, 16000)))
    return out


COMMANDS = [n for n in REFS if n.startswith("cards") or n == "goforward.raw"]


class TestSphinxAccuracy:
    # Continuous speech costs pocketsphinx ~0.4 core-seconds per second (a live pass
    # for partials, a second pass for finals): 4 live sessions fit on 2 cores.
    async def test_sphinx_streaming_pcm16(
        self, gateway: GatewayProcess, shared_audio: Path, batch_sphinx: dict[str, tuple[str, str]]
    ) -> None:
        streamed = await stream_all(
            gateway.url, shared_audio, at_once=4, model="pocketsphinx-en-us", realtime=1.0
        )
        batch = {n: t[0] for n, t in batch_sphinx.items()}
        everything = list(REFS)
        print(
            f"sphinx pcm16: librivox stream {wer(streamed, LIBRIVOX):.3f} batch {wer(batch, LIBRIVOX):.3f}; "
            f"commands stream {wer(streamed, COMMANDS):.3f} batch {wer(batch, COMMANDS):.3f}; "
            f"all stream {wer(streamed, everything):.3f} batch {wer(batch, everything):.3f}"
        )
        assert wer(streamed, LIBRIVOX) <= 0.28
        assert wer(streamed, COMMANDS) <= 0.10
        assert wer(streamed, everything) <= wer(batch, everything) * 1.05 + 1e-9

    async def test_sphinx_streaming_mulaw_8k(
        self, gateway: GatewayProcess, shared_audio: Path, batch_sphinx: dict[str, tuple[str, str]]
    ) -> None:
        streamed = await stream_all(
            gateway.url,
            shared_audio,
            at_once=4,
            model="pocketsphinx-en-us",
            realtime=1.0,
            rate=8000,
            fmt="mulaw",
        )
        batch = {n: t[1] for n, t in batch_sphinx.items()}
        everything = list(REFS)
        print(
            f"sphinx mulaw-8k: commands stream {wer(streamed, COMMANDS):.3f} batch {wer(batch, COMMANDS):.3f}; "
            f"all stream {wer(streamed, everything):.3f} batch {wer(batch, everything):.3f}"
        )
        assert wer(streamed, everything) <= wer(batch, everything) * 1.05 + 1e-9
        assert wer(streamed, everything) <= 0.50  # measured 0.37: 8 kHz phone audio is hard for it


class TestConcurrency:
    async def test_twenty_sessions_at_once_in_real_time(
        self, gateway: GatewayProcess, shared_audio: Path
    ) -> None:
        names = [n for n in REFS for _ in range(2)][:20]
        texts = await asyncio.gather(
            *(
                transcribe_stream(
                    gateway.url, load(shared_audio, n), model="whisper-tiny.en", realtime=1.0
                )
                for n in names
            )
        )
        pairs = [(REFS[n], t) for n, t in zip(names, texts, strict=True)]
        assert all(t.strip() for t in texts)
        total = corpus_wer(pairs)
        print(f"20 concurrent sessions: WER {total:.3f}")
        assert total <= 0.10
        health = gateway.health()
        assert health["streams"]["LOCAL"]["whisper"] == 0
        # Twenty callers on two cores make finals late, and admission refuses
        # new sessions while they are; once the burst is over and the engine has
        # caught up (idle for a second), it admits again, well within the
        # 10 s the lateness is remembered for.
        began = time.monotonic()
        ws, _ = await open_session(gateway.url, retry_busy=True)
        await ws.close()
        assert time.monotonic() - began < 5
