"""Offline: partials encoded over a shortened window, against the whole 30 s window.

Run by hand (never in CI), from the repository root, on an otherwise idle machine:

    .venv/bin/python bench/partial_window.py [--synth | --heldout | --fresh] [--padding full,10000,6000]

No server: each clip is cut into utterances by the gateway's own VAD and
endpointer (as ``bench/final_variants.py`` does), and every utterance is decoded
as the LOCAL stream decodes partials (beam 1, no timestamps, temperature 0):
once for each ``partial_interval_ms`` (700 ms) of its audio, as the partials of
a stream come, and once whole.  Each ``--padding`` setting is how much of the
padding a partial's window keeps (``WhisperEngine.short_padding_ms``;
``full``: the whole window, as every decode was before).

Printed per setting: the WER of the whole-utterance partials against the
references, how far the partials as they come differ from the full window's
(WER of one against the other), and the wall time of a partial's decode on one
worker (ratios between settings of one run are the figure: the machine is
shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from tests.textnorm import corpus_wer  # noqa: E402

from final_variants import utterances  # noqa: E402
from local_engine import add_clip_set_arguments, clip_set_of, load_clips, pct  # noqa: E402
from transcribe_gateway.audio.decode import Samples  # noqa: E402
from transcribe_gateway.audio.vad import SAMPLE_RATE  # noqa: E402
from transcribe_gateway.providers.whisper_engine import (  # noqa: E402
    BUNDLED_MODEL,
    WhisperEngine,
    resolve_whisper_model,
)

PARTIAL_EVERY = 700 * SAMPLE_RATE // 1000
"""The default ``[local] partial_interval_ms``."""


def partial(engine: WhisperEngine, audio: Samples, spent: list[float]) -> str:
    """A partial's text, as the LOCAL stream decodes it; its wall time goes to ``spent``."""
    began = time.perf_counter()
    text = engine.transcribe(audio, final=False).text
    spent.append(time.perf_counter() - began)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_clip_set_arguments(parser)
    parser.add_argument(
        "--padding", default="full,10000,6000", help="padding kept, ms, or full (comma list)"
    )
    args = parser.parse_args()
    clip_set = clip_set_of(args)
    clips, refs, _groups = load_clips(clip_set)
    engine = WhisperEngine(BUNDLED_MODEL, resolve_whisper_model(BUNDLED_MODEL, {}, False), 1)
    cuts = {name: utterances(audio) for name, audio in clips.items()}
    settings = args.padding.split(",")
    whole: dict[str, dict[str, str]] = {}  # setting -> clip -> its utterances' partials
    coming: dict[str, list[str]] = {}  # setting -> the partials as a stream makes them
    timed: dict[str, list[float]] = {}
    for setting in settings:
        engine.short_padding_ms = None if setting == "full" else int(setting)
        before = engine.encoder.short_encodes
        spent = timed[setting] = []
        coming[setting], whole[setting] = [], {}
        for name, audio in clips.items():
            texts = []
            for start, end in cuts[name]:
                for at in range(start + SAMPLE_RATE // 2, end, PARTIAL_EVERY):
                    coming[setting].append(partial(engine, audio[start:at], spent))
                texts.append(partial(engine, audio[start:end], spent))
            whole[setting][name] = " ".join(texts)
        spent.sort()
        if setting != "full" and engine.encoder.short_encodes == before:
            sys.exit(f"padding {setting}: no window was shortened")

    words = sum(len(refs[name].split()) for name in clips)
    print(f"## Partials on a short window, {BUNDLED_MODEL}, {clip_set}\n")
    print(f"{len(clips)} clips, {words} words, {len(coming[settings[0]])} partials as they come\n")
    print(
        f"| padding kept | whole-utterance partial WER | partials against `{settings[0]}`'s "
        "| decode median (s) | p95 (s) |\n|---|---|---|---|---|"
    )
    for setting in settings:
        wer = corpus_wer([(refs[name], whole[setting][name]) for name in clips])
        pairs = list(zip(coming[settings[0]], coming[setting], strict=True))
        apart = corpus_wer([(a or "-", b) for a, b in pairs])
        spent = timed[setting]
        print(
            f"| {setting} | {wer:.3f} | {apart:.3f} | "
            f"{statistics.median(spent):.3f} | {pct(spent, 0.95):.3f} |"
        )


if __name__ == "__main__":
    main()
