"""Would batching sessions' decodes help Whisper on CPU?  The encoder's cost per item by batch size.

Run by hand (never in CI), from the repository root, pinned to one core:

    taskset -c 0 .venv/bin/python bench/whisper_batching.py [--batches 1,2,4,8] [--repeats 3]

Every Whisper decode runs the encoder on a 30 s padded window (most of a
decode's ~0.45 core-seconds; ``../shared/ENGINES.md``).  If CTranslate2 ran a
batch of windows for much less than the sum of its items, the decode pool could
gather the sessions' due partials and finals into one call.  This measures the
encoder alone (one thread, int8, as the pool's workers run it) on a window of
real speech repeated B times; the ratio column is per-item cost against B = 1
in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.conftest import SHARED_AUDIO  # noqa: E402

from transcribe_gateway.audio.files import read_audio  # noqa: E402
from transcribe_gateway.providers.whisper_engine import (  # noqa: E402
    BUNDLED_MODEL,
    WhisperEngine,
    resolve_whisper_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    args = parser.parse_args()

    import ctranslate2
    from faster_whisper.audio import pad_or_trim

    engine = WhisperEngine(BUNDLED_MODEL, resolve_whisper_model(BUNDLED_MODEL, {}, False), 1)
    audio = read_audio(SHARED_AUDIO / "jfk.flac").astype(np.float32) / 32768.0
    window = pad_or_trim(engine.model.feature_extractor(audio))  # (80, 3000): 30 s
    per_item: dict[int, float] = {}
    for size in (int(b) for b in args.batches.split(",")):
        features = ctranslate2.StorageView.from_array(
            np.ascontiguousarray(np.stack([window] * size))
        )
        engine.model.model.encode(features)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.model.model.encode(features)
            times.append(time.perf_counter() - start)
        per_item[size] = statistics.median(times) / size
    base = per_item[min(per_item)]
    print(f"## Whisper encoder by batch size ({BUNDLED_MODEL}, int8, one thread)\n")
    print("| batch | seconds per item | per item against batch 1 |")
    print("|---|---|---|")
    for size, seconds in per_item.items():
        print(f"| {size} | {seconds:.3f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
