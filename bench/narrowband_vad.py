"""Phone audio (8 kHz) and the VAD: how much speech each way of hearing it misses.

Run by hand (never in CI), from the repository root:

    .venv/bin/python bench/narrowband_vad.py [--synth] [--wer]

Each clip (with the second of silence the streaming benchmark adds) goes
through what a phone line does to it: 8 kHz, G.711 mu-law (and plain pcm16 at
8 kHz), then back to 16 kHz in 20 ms chunks through the gateway's own
streaming resampler, as a session at ``sample_rate: 8000`` receives it.  The
gateway's VAD and endpointer then cut it into utterances, hearing it as:

* ``plain``: Silero on the resampled audio as it is (what every stream did
  before ``NarrowbandVad``);
* ``widened``: Silero on :class:`~transcribe_gateway.audio.vad.Widen`'s audio
  only;
* ``both``: :class:`~transcribe_gateway.audio.vad.NarrowbandVad`, the larger of
  the two probabilities per frame (what 8 kHz sessions use).

Reported: the share of the speech the VAD finds in the original 16 kHz clip
that each misses (speech lost: a cut starts late or ends early), and how much
it adds.  ``--wer`` also decodes each cut as the stream's final (Whisper
tiny.en) and gives the word error rate of the mu-law clips.  Deterministic:
the same table on every run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from tests.textnorm import corpus_wer  # noqa: E402

from final_variants import Utterances, cut  # noqa: E402
from local_engine import ENDPOINTING_MS, load_clips  # noqa: E402
from transcribe_gateway.audio.decode import decode_audio, encode_mulaw  # noqa: E402
from transcribe_gateway.audio.resample import Resampler, resample  # noqa: E402
from transcribe_gateway.audio.vad import (  # noqa: E402
    SAMPLE_RATE,
    Endpointer,
    NarrowbandVad,
    SileroVad,
    Widen,
)
from transcribe_gateway.providers.whisper_engine import (  # noqa: E402
    BUNDLED_MODEL,
    WhisperEngine,
    resolve_whisper_model,
)

CHUNK_8K = 160  # 20 ms


class WidenedOnly:
    def __init__(self) -> None:
        self._vad, self._widen = SileroVad(), Widen()

    def process(self, samples: np.ndarray) -> np.ndarray:
        return self._vad.process(self._widen.process(samples))


HEARINGS: dict[str, Callable[[], SileroVad | WidenedOnly | NarrowbandVad]] = {
    "plain": SileroVad,
    "widened": WidenedOnly,
    "both": NarrowbandVad,
}


def cut_with(chunks: list[np.ndarray], vad: SileroVad | WidenedOnly | NarrowbandVad) -> Utterances:
    """Utterances as a stream's endpointer cuts them, ``vad`` fed chunk by chunk."""
    endpointer = Endpointer(endpointing_ms=ENDPOINTING_MS)
    return cut(chunks, lambda chunk: endpointer.process(vad.process(chunk)))


def phone_line(audio: np.ndarray, mulaw: bool) -> list[np.ndarray]:
    """16 kHz clip -> 8 kHz (mu-law or pcm16) -> 16 kHz chunks, as a session receives it."""
    narrow = resample(audio, SAMPLE_RATE, 8000)
    if mulaw:
        narrow = decode_audio(encode_mulaw(narrow), "mulaw")
    up = Resampler(8000, SAMPLE_RATE)
    chunks = [up.push(narrow[i : i + CHUNK_8K]) for i in range(0, len(narrow), CHUNK_8K)]
    return [*chunks, up.flush()]


def mask(cuts: Utterances, length: int) -> np.ndarray:
    covered = np.zeros(length, dtype=bool)
    for start, end in cuts:
        covered[start:end] = True
    return covered


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synth", action="store_true", help="synthesized speech (espeak-ng)")
    parser.add_argument("--wer", action="store_true", help="decode the mu-law cuts (slower)")
    args = parser.parse_args()
    clips, refs, _groups = load_clips("synth" if args.synth else "recordings")
    engine = None
    if args.wer:
        engine = WhisperEngine(BUNDLED_MODEL, resolve_whisper_model(BUNDLED_MODEL, {}, False), 1)
    missed = {(line, h): 0 for line in ("mulaw", "pcm16") for h in HEARINGS}
    extra = dict(missed)
    speech = {"mulaw": 0, "pcm16": 0}
    texts: dict[str, list[tuple[str, str]]] = {h: [] for h in HEARINGS}
    for name, audio in clips.items():
        wide = [audio[i : i + 320] for i in range(0, len(audio), 320)]
        for line in ("mulaw", "pcm16"):
            chunks = phone_line(audio, line == "mulaw")
            received = np.concatenate(chunks)
            length = min(len(audio), len(received))
            reference = mask(cut_with(wide, SileroVad()), length)
            speech[line] += int(reference.sum())
            for hearing, make in HEARINGS.items():
                cuts = cut_with(chunks, make())
                heard = mask(cuts, length)
                missed[line, hearing] += int((reference & ~heard).sum())
                extra[line, hearing] += int((heard & ~reference).sum())
                if engine is not None and line == "mulaw":
                    final = " ".join(
                        engine.transcribe(received[s:e], final=True).text for s, e in cuts
                    )
                    texts[hearing].append((refs[name], final))
    what = "synthesized speech" if args.synth else "recordings"
    print(f"## The VAD on 8 kHz audio ({len(clips)} clips, {what})\n")
    print("Share of the speech the VAD finds at 16 kHz that each hearing misses / adds:\n")
    print("| hearing | mu-law missed | mu-law added | pcm16 8 kHz missed | pcm16 8 kHz added |")
    print("|---|---|---|---|---|")
    for hearing in HEARINGS:
        cells = [
            f"{share:.1%}"
            for line in ("mulaw", "pcm16")
            for share in (missed[line, hearing] / speech[line], extra[line, hearing] / speech[line])
        ]
        print(f"| {hearing} | " + " | ".join(cells) + " |")
    if engine is not None:
        print("\nWER of the mu-law cuts, each decoded as a final:\n")
        print("| hearing | WER |")
        print("|---|---|")
        for hearing, pairs in texts.items():
            print(f"| {hearing} | {corpus_wer(pairs):.3f} |")


if __name__ == "__main__":
    main()
