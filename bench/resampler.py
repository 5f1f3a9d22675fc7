"""How long the streaming resampler holds audio back, and what a chunk costs.

Run by hand (never in CI), from the repository root::

    .venv/bin/python bench/resampler.py

For each rate pair an engine may need (a phone line's 8 kHz to 16 or 24 kHz,
a browser's 44.1 or 48 kHz to 16 kHz), it pushes 20 ms chunks through the
gateway's :class:`Resampler` and through soxr's ``ResampleStream`` (what the
gateway used for every pair before), and reports, after each chunk, how much
of the audio given has not come out yet (mean and worst, in ms), and the time
a 20 ms chunk of speech takes (best of ``--repeats`` runs of ``--pushes``).
Both are measured in the same run, so the cost reads as a ratio too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

from transcribe_gateway.audio.decode import Samples
from transcribe_gateway.audio.files import read_audio
from transcribe_gateway.audio.resample import Resampler, to_int16

SPEECH = Path(__file__).resolve().parents[1].parent / "shared" / "audio" / "jfk.flac"
PAIRS = ((8000, 16000), (8000, 24000), (16000, 24000), (44100, 16000), (48000, 16000))


def soxr_stream(in_rate: int, out_rate: int) -> Callable[[Samples], Samples]:
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")
    return lambda chunk: to_int16(stream.resample_chunk(chunk.astype(np.float32)))


def gateway(in_rate: int, out_rate: int) -> Callable[[Samples], Samples]:
    return Resampler(in_rate, out_rate).push


def held_ms(
    push: Callable[[Samples], Samples], audio: Samples, in_rate: int, out_rate: int
) -> tuple[float, float]:
    """Mean and worst audio held back after each 20 ms chunk (ms), past the first second."""
    step, given, taken, held = in_rate // 50, 0, 0, []
    for start in range(0, len(audio) - step, step):
        given += step
        taken += len(push(audio[start : start + step]))
        if given >= in_rate:
            held.append(1000 * (given / in_rate - taken / out_rate))
    return float(np.mean(held)), float(np.max(held))


def cost_us(
    make: Callable[[int, int], Callable[[Samples], Samples]],
    rates: tuple[int, int],
    chunk: Samples,
    pushes: int,
    repeats: int,
) -> float:
    best = float("inf")
    for _ in range(repeats):
        push = make(*rates)
        started = time.perf_counter()
        for _ in range(pushes):
            push(chunk)
        best = min(best, (time.perf_counter() - started) / pushes)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        "| rate | soxr held mean / worst (ms) | gateway held mean / worst (ms) "
        "| soxr us/chunk | gateway us/chunk | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for in_rate, out_rate in PAIRS:
        audio = read_audio(SPEECH, rate=in_rate)
        chunk = audio[in_rate : in_rate + in_rate // 50]
        s_mean, s_worst = held_ms(soxr_stream(in_rate, out_rate), audio, in_rate, out_rate)
        g_mean, g_worst = held_ms(gateway(in_rate, out_rate), audio, in_rate, out_rate)
        s_us = cost_us(soxr_stream, (in_rate, out_rate), chunk, args.pushes, args.repeats)
        g_us = cost_us(gateway, (in_rate, out_rate), chunk, args.pushes, args.repeats)
        print(
            f"| {in_rate} -> {out_rate} | {s_mean:.1f} / {s_worst:.1f} | {g_mean:.1f} / "
            f"{g_worst:.1f} | {s_us:.1f} | {g_us:.1f} | {g_us / s_us:.2f}x |"
        )


if __name__ == "__main__":
    main()
