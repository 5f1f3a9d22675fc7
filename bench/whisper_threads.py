"""Whisper on one thread or on every core: the encoder, the decoder, and the two side by side.

Run by hand (never in CI), from the repository root, on an otherwise idle machine:

    .venv/bin/python bench/whisper_threads.py [--threads 2] [--repeats 5]

A decode is the encoder on a 30 s window, then the token-by-token decoder.
This times each part on a one-thread CTranslate2 replica (as the decode pool's
workers run them) and on a replica with ``--threads`` intra-op threads, alone
and beside another part running in a second thread (what a busy pool does), then
whole finals (beam 5, word timestamps) of the recordings in ``../shared/audio``
on a one-worker engine against a two-worker engine, whose
:class:`~transcribe_gateway.providers.whisper_encoder.Encoder` encodes a lone
decode on every core.  Medians of ``--repeats`` calls; the parts on LibriVox
0870 (8 s of speech).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.textnorm import SHARED_AUDIO, references  # noqa: E402

from transcribe_gateway.audio.files import read_audio  # noqa: E402
from transcribe_gateway.providers.whisper_engine import (  # noqa: E402
    BUNDLED_MODEL,
    WhisperEngine,
    resolve_whisper_model,
)

CLIP = "sense_and_sensibility_01_austen_64kb-0870.wav"


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median call times of ``a`` and ``b``, each called in a loop in its own thread."""
    results: dict[str, float] = {}

    def loop(name: str, fn: Callable[[], Any]) -> None:
        results[name] = median_time(fn, repeats)

    threads = [threading.Thread(target=loop, args=(n, f)) for n, f in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results["a"], results["b"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of the wide replica")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    args = parser.parse_args()

    import ctranslate2
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    path = resolve_whisper_model(BUNDLED_MODEL, {}, False)
    one = WhisperEngine(BUNDLED_MODEL, path, 1)
    two = WhisperEngine(BUNDLED_MODEL, path, 2)
    narrow = two.model.model  # the pool's replicas: one intra-op thread each
    wide = ctranslate2.models.Whisper(
        path, device="cpu", compute_type="int8", intra_threads=args.threads
    )
    samples = read_audio(SHARED_AUDIO / CLIP)
    window = pad_or_trim(one.model.feature_extractor(samples.astype(np.float32) / 32768.0))
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(window[None]))
    encoded = narrow.encode(features)
    tokenizer = Tokenizer(one.model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = [list(tokenizer.sot_sequence)]

    def encode(model: Any) -> Callable[[], Any]:
        return lambda: model.encode(features)

    def decode(model: Any) -> Callable[[], Any]:
        return lambda: model.generate(encoded, prompt, beam_size=5, max_length=224)

    for model in (narrow, wide):
        encode(model)()
        decode(model)()
    n, r = args.threads, args.repeats
    rows = [
        ("encoder alone, 1 thread", median_time(encode(narrow), r)),
        (f"encoder alone, {n} threads", median_time(encode(wide), r)),
        ("decoder (beam 5) alone, 1 thread", median_time(decode(narrow), r)),
        (f"decoder (beam 5) alone, {n} threads", median_time(decode(wide), r)),
    ]
    for label, (a, b) in (
        (
            "encoder 1 thread, beside another on 1 thread",
            side_by_side(encode(narrow), encode(narrow), r),
        ),
        (
            f"encoder {n} threads, beside a decoder on 1 thread",
            side_by_side(encode(wide), decode(narrow), r),
        ),
        (
            f"encoder {n} threads, beside an encoder on 1 thread",
            side_by_side(encode(wide), encode(narrow), r),
        ),
        (
            f"encoder {n} threads, beside another on {n} threads",
            side_by_side(encode(wide), encode(wide), r),
        ),
    ):
        rows.append((f"{label}: the first", a))
        rows.append((f"{label}: the other", b))

    def finals(engine: WhisperEngine) -> float:
        """Seconds of the median final decode, summed over the recordings."""
        return sum(median_time(partial(engine.transcribe, clip, final=True), r) for clip in clips)

    clips = [read_audio(SHARED_AUDIO / name) for name in references()]
    single, split = finals(one), finals(two)
    base = rows[0][1]
    print(f"## Whisper by threads ({BUNDLED_MODEL}, int8, {CLIP})\n")
    print("| what | seconds per call | against the encoder alone on 1 thread |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {seconds / base:.2f}x |")
    print(
        f"\nWhole finals alone, the {len(clips)} recordings, sum of medians: one-worker "
        f"engine {single:.2f} s, two-worker engine {split:.2f} s ({split / single:.2f}x); "
        f"encodes on every core: {two.encoder.wide_encodes}"
    )


if __name__ == "__main__":
    main()
