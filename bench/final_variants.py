"""Offline: how a streaming final's audio and context change Whisper's WER against batch.

Run by hand (never in CI), from the repository root:

    .venv/bin/python bench/final_variants.py [--synth | --heldout | --fresh] [--variants cut,pad-100,prompt,left-context,...]
    TRANSCRIBE_CONFIG=models.toml .venv/bin/python bench/final_variants.py --model whisper-base [...]
        # a model of [local.whisper_models] instead of the bundled one

No server: each clip is cut into utterances by the gateway's own VAD and
endpointer (Silero, the endpointing the load benchmark uses), and every
utterance is decoded the way a variant says, with the final's settings (beam 5,
word timestamps).  ``cut`` is what the LOCAL stream does with ``final_context =
false`` (each utterance alone), ``context`` what it does by default; the others
are ideas for closing the gap to batch (the whole clip decoded at once),
measured here before any is built into the stream:

* ``pad-N``: N ms more of the audio after the cut (the endpointing silence is
  already in the buffer when the final is due, so this costs no latency);
* ``prompt``: the session's previous finals as Whisper's prompt;
* ``left-context``: the previous utterances' audio (up to 10 s) decoded in
  front of this one, their finals forced as the decoder's prefix, and only what
  follows the prefix kept (decoded alone if nothing follows);
* ``rerank-pad``: ``cut`` and ``pad-100`` both decoded, the one whose tokens
  have the higher mean log-probability kept; ``rerank-hello``: the same among
  those two and ``cut`` with the prompt "Hello." (a known Whisper nudge);
* ``lenpen-0.8``: ``cut`` with beam search's length penalty at 0.8 (1 is
  faster-whisper's default; lower favours shorter hypotheses);
* ``context``: as the LOCAL stream decoded finals before ``context-short-later`` (``final_context``):
  after the session's speech of the last ``CONTEXT_MS`` and before a repeat of
  the utterance, in one window (``whisper_engine.in_context``); ``context-N``:
  the same after N ms of earlier speech (``context-0``: the repeat alone);
  ``context-short``: ``context`` on a short window (``SHORT_PADDING_MS``), as a
  final decoded while other decodes wait for a worker is; ``context-short-later``:
  the short window only for a final with earlier speech before it, as the
  stream decodes finals by default (but for ``-repeats``, below);
  ``context-short-first-N``: that, and a session's first final on a short
  window with N ms of padding;
  ``context-short-later-beam-N``: the default with a beam of N instead of 5
  (``[local] whisper_beam_size``); ``context-short-self``: the default, but a
  session's first final, with no earlier speech, has its own utterance as that
  speech (three copies, the middle one kept) and takes the short window;
  ``context-short-later-prompt``: the default, with the finals of the
  session's utterances before its context (older than ``CONTEXT_MS``) as
  Whisper's prompt, as batch's long-form decode carries a window's text into
  the next; ``context-short-later-repeats``: the default, but an utterance
  whose partial says a word or phrase twice in a row is decoded alone at once
  (``whisper_copies.repeats_itself``), as the stream does since 2026-12-07
  (here a partial's decode of the whole utterance stands for its last partial);
  ``context-short-later-primer-recorded`` and ``-primer-espeak``: the default,
  but a session's first final has fixed speech before it, as if the session's
  earlier speech, on the whole window: 3 s of a LibriVox recording, or a
  sentence by espeak-ng in a voice no clip set uses (:func:`espeak_primer`);
  ``context-short-later-repeats-lookahead-N``: the stream's finals, but a
  session's first final waits for N ms of the audio after its utterance and is
  decoded with it on the whole window, its words those that start before the
  utterance's end (a final that waits for the speaker's next words);
* ``hold-1500``: semantic endpointing (``endpointing_unfinished`` 1500), roughly
  as OpenAI's ``semantic_vad`` and LiveKit's turn detector: a final whose text
  does not end a sentence (``local_whisper.ends_sentence``) is held, and if
  speech resumes within 1500 ms of its end the two are one utterance (decoded
  again, and held again if still unfinished); ``context-hold-1500``: the same
  with ``context``.

``--heldout`` runs the variants on ``SYNTH_HELDOUT`` (bench/local_engine.py):
clips in other voices, made after the variants above were chosen on the
recordings and ``--synth``, to tell a setting that helps from one that fits.
``--fresh`` runs them on ``SYNTH_FRESH``, a second such set, for a setting
whose choice ``SYNTH_HELDOUT`` has helped make.

``--batch-spread`` adds batch's own spread (each clip decoded whole again with
10-100 ms of silence in front, which gives Whisper nothing new to hear), the
scale a streaming figure's distance from batch is read against.
``--by-position`` (synthesized sets) adds the WER of each clip's first
utterance (a session's first, with no earlier speech) and of the later ones,
and, for the first, what batch has that the stream does not: the first
utterance followed by speech (``another voice after``: the next clip's first
utterance, in another voice, after a silence; its words kept by their times),
which tells how much of batch's lead is speech after an utterance at all and
how much its own speaker's next words.
``--calls`` (synthesized sets) streams each voice's clips one after another as
one session, as a call of many turns is, instead of one session per clip: a
session's first utterance is then one in twenty, not one in two or three.

WER does not depend on timing here; one run is the figure, but for the decodes
that fall back to faster-whisper's sampling (a word or two between runs).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from tests.textnorm import SHARED_AUDIO, corpus_wer, normalize  # noqa: E402

from local_engine import (  # noqa: E402
    ENDPOINTING_MS,
    SPOKEN,
    SYNTH,
    SYNTH_TURNS,
    add_clip_set_arguments,
    calls,
    clip_set_of,
    load_clips,
    pct,
    whisper_engine,
)
from transcribe_gateway.audio.files import read_audio  # noqa: E402
from transcribe_gateway.audio.vad import (  # noqa: E402
    SAMPLE_RATE,
    Endpointer,
    VadEvent,
    VoiceActivity,
)
from transcribe_gateway.providers.base import WordTiming  # noqa: E402
from transcribe_gateway.providers.local_whisper import CONTEXT_MS, ends_sentence  # noqa: E402
from transcribe_gateway.providers.whisper_copies import repeats_itself  # noqa: E402
from transcribe_gateway.providers.whisper_engine import (  # noqa: E402
    BUNDLED_MODEL,
    REPEAT_GAP_MS,
    WhisperEngine,
)

LEFT_CONTEXT_S = 10.0
PROMPT_CHARS = 200
"""The most of the earlier finals a variant gives Whisper as its prompt."""
REPEAT_GAP = np.zeros(REPEAT_GAP_MS * SAMPLE_RATE // 1000, np.int16)
"""The silence ``whisper_engine.in_context`` puts between two copies."""
Utterances = list[tuple[int, int]]
Variant = Callable[[np.ndarray, Utterances], str]


def cut(
    chunks: Iterable[np.ndarray], boundaries: Callable[[np.ndarray], list[VadEvent]]
) -> Utterances:
    """(start, end) samples of each utterance, from a VAD fed the chunks in order."""
    cuts: Utterances = []
    start: int | None = None
    total = 0
    for chunk in chunks:
        total += len(chunk)
        for event in boundaries(chunk):
            if event.kind == "start":
                start = event.sample
            elif start is not None:
                cuts.append((start, event.sample))
                start = None
    if start is not None:  # speech to the end: the stream finalizes it at end of input
        cuts.append((start, total))
    return cuts


def utterances(audio: np.ndarray, endpointing_ms: int = ENDPOINTING_MS) -> Utterances:
    """(start, end) samples of each utterance, as the LOCAL stream's VAD cuts them."""
    activity = VoiceActivity(Endpointer(endpointing_ms=endpointing_ms))
    step = SAMPLE_RATE // 50  # 20 ms chunks, as clients send
    return cut((audio[i : i + step] for i in range(0, len(audio), step)), activity.process)


def context_from(starts: list[int], start: int, context_ms: int = CONTEXT_MS) -> int:
    """The first utterance (an index of ``starts``) that started within ``context_ms``
    before ``start``; ``len(starts)`` if none did."""
    return next(
        k for k, a in enumerate([*starts, start]) if start - a <= context_ms * SAMPLE_RATE // 1000
    )


def context_of(
    audio: np.ndarray, starts: list[int], start: int, context_ms: int = CONTEXT_MS
) -> np.ndarray:
    """As the LOCAL stream decodes finals with ``final_context``: the audio since the
    first utterance (of ``starts``) that started within ``context_ms`` before ``start``."""
    return audio[[*starts, start][context_from(starts, start, context_ms)] : start]


def variants(
    engine: WhisperEngine, times: list[float], unrepeated: list[str]
) -> dict[str, Variant]:
    """The variants by name; ``times`` gets the wall time of each final's decode(s),
    ``unrepeated`` the partial of each final decoded without its repeat."""

    def decode(
        audio: np.ndarray,
        prompt: str | None = None,
        prefix: str | None = None,
        context: np.ndarray | None = None,
        short: bool = False,
        beam: int = 5,
        with_repeat: bool = True,
    ) -> str:
        # The final's own decode (beam search, word timestamps), as the stream runs it.
        began = time.perf_counter()
        found = engine.transcribe(
            audio,
            final=True,
            prompt=prompt,
            prefix=prefix,
            context=context,
            short_window=short,
            beam_size=beam,
            with_repeat=with_repeat,
        )
        times.append(time.perf_counter() - began)
        return found.text.strip()

    def read_ahead(window: np.ndarray, length: int) -> str:
        # The first ``length`` samples' words of ``window`` decoded whole: those that
        # start 100 ms before that end or sooner (Whisper stretches an utterance's
        # last word into the pause after it, so its middle may lie past the end).
        began = time.perf_counter()
        words = engine.transcribe(window, final=True).words
        times.append(time.perf_counter() - began)
        keep_ms = length * 1000 // SAMPLE_RATE - 100
        return " ".join(w.word for w in words if w.start_ms < keep_ms)

    def cut(audio: np.ndarray, cuts: Utterances) -> str:
        # Each utterance alone: the LOCAL stream with ``final_context = false``.
        return " ".join(decode(audio[s:e]) for s, e in cuts)

    def padded(ms: int) -> Variant:
        def run(audio: np.ndarray, cuts: Utterances) -> str:
            return " ".join(decode(audio[s : e + ms * SAMPLE_RATE // 1000]) for s, e in cuts)

        return run

    def prompt(audio: np.ndarray, cuts: Utterances) -> str:
        finals: list[str] = []
        for s, e in cuts:
            finals.append(decode(audio[s:e], prompt=" ".join(finals)[-PROMPT_CHARS:]))
        return " ".join(finals)

    def left_context(audio: np.ndarray, cuts: Utterances) -> str:
        finals: list[str] = []
        for i, (s, e) in enumerate(cuts):
            first = i
            while first > 0 and s - cuts[first - 1][0] <= LEFT_CONTEXT_S * SAMPLE_RATE:
                first -= 1
            prefix = " ".join(finals[first:i]).strip()
            text = ""
            if prefix:
                whole = decode(audio[cuts[first][0] : e], prefix=prefix)
                if whole.startswith(prefix):
                    text = whole[len(prefix) :].strip()
            finals.append(text or decode(audio[s:e]))
        return " ".join(finals)

    def in_context(
        context_ms: int = CONTEXT_MS,
        short: bool | None = False,
        first_padding_ms: int | None = None,
        beam: int = 5,
        self_first: bool = False,
        earlier_prompt: bool = False,
        as_partials_say: bool = False,
        first_primer: Callable[[], np.ndarray] | None = None,
        first_lookahead_ms: int | None = None,
    ) -> Variant:
        # short=None: a short window for a final with earlier speech before it;
        # first_padding_ms: a session's first final too, with this much padding;
        # beam: the final's beam size ([local] whisper_beam_size); earlier_prompt:
        # the finals of the utterances before the context's as the prompt;
        # as_partials_say: no repeat for an utterance whose partial (here: a
        # partial's decode of all of it) says a word or phrase twice in a row;
        # first_primer: a session's first final has this speech before it, on the
        # whole window; first_lookahead_ms: a session's first final waits for this
        # much of the audio after it and is decoded with it (:func:`read_ahead`).
        def run(audio: np.ndarray, cuts: Utterances) -> str:
            starts = [s for s, _ in cuts]
            texts: list[str] = []
            for i, (s, e) in enumerate(cuts):
                before = context_of(audio, starts[:i], s, context_ms)
                prompt = None
                if earlier_prompt:
                    first = context_from(starts[:i], s, context_ms)
                    prompt = " ".join(texts[:first])[-PROMPT_CHARS:] or None
                if self_first and not len(before):
                    before = np.concatenate([audio[s:e], REPEAT_GAP])
                after_speech = len(before) > 0 if short is None else short
                if first_primer is not None and not len(before):
                    before, after_speech = np.concatenate([first_primer(), REPEAT_GAP]), False
                if first_lookahead_ms is not None and not len(before):
                    ahead = audio[s : e + first_lookahead_ms * SAMPLE_RATE // 1000]
                    texts.append(read_ahead(ahead, e - s))
                    continue
                partial = engine.transcribe(audio[s:e], final=False).text if as_partials_say else ""
                alone = repeats_itself(partial)
                if alone:
                    unrepeated.append(partial)
                if first_padding_ms is None or after_speech:
                    texts.append(
                        decode(
                            audio[s:e],
                            prompt=prompt,
                            context=before,
                            short=after_speech,
                            beam=beam,
                            with_repeat=not alone,
                        )
                    )
                    continue
                kept, engine.short_padding_ms = engine.short_padding_ms, first_padding_ms
                try:
                    texts.append(decode(audio[s:e], context=before, short=True, beam=beam))
                finally:
                    engine.short_padding_ms = kept
            return " ".join(texts)

        return run

    def segments(audio: np.ndarray, prompt: str | None = None, **options: Any) -> list[Any]:
        # The final's decode with faster-whisper's own result (WhisperEngine.transcribe
        # keeps only text and words) and, in ``options``, settings the stream does not use.
        found, _ = engine.model.transcribe(
            audio.astype(np.float32) / 32768.0,
            language="en",
            initial_prompt=prompt,
            vad_filter=False,
            condition_on_previous_text=False,
            beam_size=5,
            word_timestamps=True,
            **options,
        )
        return list(found)

    def scored(audio: np.ndarray, prompt: str | None) -> tuple[float, str]:
        # The final's decode, with the mean log-probability of its tokens.
        segments_ = segments(audio, prompt)
        tokens = sum(len(s.tokens) for s in segments_)
        score = sum(s.avg_logprob * len(s.tokens) for s in segments_) / tokens if tokens else -1e9
        return score, " ".join(s.text.strip() for s in segments_).strip()

    def reranked(*choices: tuple[int, str | None]) -> Variant:
        def run(audio: np.ndarray, cuts: Utterances) -> str:
            return " ".join(
                max(scored(audio[s : e + ms * SAMPLE_RATE // 1000], p) for ms, p in choices)[1]
                for s, e in cuts
            )

        return run

    def length_penalty(penalty: float) -> Variant:
        def run(audio: np.ndarray, cuts: Utterances) -> str:
            return " ".join(
                " ".join(x.text.strip() for x in segments(audio[s:e], length_penalty=penalty))
                for s, e in cuts
            ).strip()

        return run

    def hold(ms: int, context: bool = False) -> Variant:
        def run(audio: np.ndarray, cuts: Utterances) -> str:
            # A pause shorter than ``ms`` lies inside one of the cuts made at ``ms``.
            longer = utterances(audio, ms)
            within = [
                next((k for k, (s, e) in enumerate(longer) if s <= a < e), -1) for a, _ in cuts
            ]
            finals: list[str] = []
            starts: list[int] = []  # of the utterances ended so far
            i = 0
            while i < len(cuts):
                start, end = cuts[i]
                before = context_of(audio, starts, start) if context else None
                text = decode(audio[start:end], context=before)
                while (
                    i + 1 < len(cuts)
                    and not ends_sentence(text)
                    and within[i + 1] == within[i] != -1
                ):
                    i += 1
                    end = cuts[i][1]
                    text = decode(audio[start:end], context=before)
                finals.append(text)
                starts.append(start)
                i += 1
            return " ".join(finals)

        return run

    return {
        "cut": cut,
        "context": in_context(),
        "context-short": in_context(short=True),
        "context-short-later": in_context(short=None),
        **{
            f"context-short-first-{ms}": in_context(short=None, first_padding_ms=ms)
            for ms in (15_000, 20_000)
        },
        "context-short-self": in_context(short=None, self_first=True),
        "context-short-later-prompt": in_context(short=None, earlier_prompt=True),
        "context-short-later-repeats": in_context(short=None, as_partials_say=True),
        "context-short-later-primer-recorded": in_context(short=None, first_primer=recorded_primer),
        "context-short-later-primer-espeak": in_context(short=None, first_primer=espeak_primer),
        **{
            f"context-short-later-repeats-lookahead-{ms}": in_context(
                short=None, as_partials_say=True, first_lookahead_ms=ms
            )
            for ms in (1000, 2000, 3000)
        },
        **{f"context-short-later-beam-{n}": in_context(short=None, beam=n) for n in (1, 2, 3)},
        **{f"context-{ms}": in_context(ms) for ms in (0, 10_000, 15_000, 20_000, 25_000)},
        "pad-100": padded(100),
        "pad-350": padded(350),
        "prompt": prompt,
        "left-context": left_context,
        "rerank-pad": reranked((0, None), (100, None)),
        "rerank-hello": reranked((0, None), (100, None), (0, "Hello.")),
        "lenpen-0.8": length_penalty(0.8),
        "hold-1500": hold(1500),
        "context-hold-1500": hold(1500, context=True),
    }


PRIMER_TEXT = "Thank you for calling. How can I help you today?"
PRIMER_VOICE = "en-gb-x-gbcwmd"
"""The ``-primer-espeak`` variant's speech: a voice no clip set uses."""


@functools.cache
def recorded_primer() -> np.ndarray:
    """The ``-primer-recorded`` variant's speech: the first 3 s of a LibriVox
    recording (real speech; the recordings set holds it too)."""
    audio = read_audio(SHARED_AUDIO / "sense_and_sensibility_01_austen_64kb-0930.wav")
    return audio[: 3 * SAMPLE_RATE]


@functools.cache
def espeak_primer() -> np.ndarray:
    """``PRIMER_TEXT`` in ``PRIMER_VOICE``, its silence trimmed to 100 ms each side."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "primer.wav"
        subprocess.run(
            ["espeak-ng", "-v", PRIMER_VOICE, "-s", "165", "-w", str(path), PRIMER_TEXT],
            check=True,
        )
        audio = read_audio(path)
    loud = np.flatnonzero(np.abs(audio) > 300)
    margin = SAMPLE_RATE // 10
    return audio[max(0, loud[0] - margin) : loud[-1] + margin]


def batch_spread(
    engine: WhisperEngine,
    clips: dict[str, np.ndarray],
    refs: dict[str, str],
    groups: dict[str, list[str]],
) -> None:
    """Batch's own noise: the same clips with 10-100 ms more silence in front, which
    adds nothing to hear.  A streaming figure within this spread of batch is as near
    batch as one batch decode is to another."""
    shifts = (0, 10, 20, 30, 40, 60, 80, 100)
    rows: dict[int, dict[str, float]] = {}
    for ms in shifts:
        lead = np.zeros(ms * SAMPLE_RATE // 1000, np.int16)
        texts = {
            n: engine.transcribe(np.concatenate([lead, a]), final=True).text
            for n, a in clips.items()
        }
        rows[ms] = {
            g: corpus_wer([(refs[n], texts[n]) for n in names]) for g, names in groups.items()
        }
    print("\n### Batch with more silence in front (its own spread)\n")
    print("| ms of silence added | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for ms, wers in rows.items():
        print(f"| {ms} | " + " | ".join(f"{w:.3f}" for w in wers.values()) + " |")
    for label, pick in (("min", min), ("mean", statistics.mean), ("max", max)):
        cells = [f"{pick(rows[ms][g] for ms in shifts):.3f}" for g in groups]
        print(f"| {label} | " + " | ".join(cells) + " |")


def _owner(starts: list[int], word: WordTiming) -> int:
    """The utterance (of those starting at ``starts``) a batch word's middle lies in."""
    middle = (word.start_ms + word.end_ms) * SAMPLE_RATE // 2000
    return max(0, bisect.bisect_right(starts, middle) - 1)


def followed(engine: WhisperEngine, utterance: np.ndarray, after: np.ndarray) -> str:
    """``utterance`` read with ``after`` following it in the window (after a
    ``REPEAT_GAP_MS`` silence): its words, those whose middle lies before the
    middle of the silence."""
    keep_to_ms = (len(utterance) + len(REPEAT_GAP) // 2) * 1000 // SAMPLE_RATE
    window = np.concatenate([utterance, REPEAT_GAP, after])
    words = engine.transcribe(window, final=True).words
    return " ".join(w.word for w in words if w.start_ms + w.end_ms < 2 * keep_to_ms)


def by_position(
    engine: WhisperEngine,
    clips: dict[str, np.ndarray],
    cuts: dict[str, Utterances],
    sentences: dict[str, tuple[str, ...]],
    voices: dict[str, str],
) -> None:
    """WER of a session's first utterance and of the later ones, streamed (alone and
    in context) and in batch, and of the first followed by another voice's speech
    (:func:`followed`).  Only clips the VAD cuts at their sentences count, so
    each utterance has its own reference; batch's words go to the utterance their
    middle lies in (from its start to the next one's)."""
    found: dict[str, dict[str, list[tuple[str, str]]]] = {
        position: {"batch": [], "cut": [], "context": [], "other": []}
        for position in ("first", "later")
    }
    kept = [n for n, said in sentences.items() if len(cuts[n]) == len(said)]
    left_out = len(sentences) - len(kept)
    for i, name in enumerate(kept):
        said, audio, clip_cuts = sentences[name], clips[name], cuts[name]
        # The next clip in another voice (the sets take their voices in turn).
        other = next(n for n in kept[i + 1 :] + kept[:i] if voices[n] != voices[name])
        (start, end), (other_start, other_end) = clip_cuts[0], cuts[other][0]
        found["first"]["other"].append(
            (said[0], followed(engine, audio[start:end], clips[other][other_start:other_end]))
        )
        starts = [s for s, _ in clip_cuts]
        batch = engine.transcribe(audio, final=True).words
        owners = [_owner(starts, w) for w in batch]
        for k, (start, end) in enumerate(clip_cuts):
            texts = found["first" if k == 0 else "later"]
            ours = " ".join(w.word for w, owner in zip(batch, owners, strict=True) if owner == k)
            texts["batch"].append((said[k], ours))
            utterance = audio[start:end]
            texts["cut"].append((said[k], engine.transcribe(utterance, final=True).text))
            context = context_of(audio, starts[:k], start)
            in_context = engine.transcribe(utterance, final=True, context=context).text
            texts["context"].append((said[k], in_context))
    print("\n### A session's first utterance and the later ones\n")
    print(f"Clips left out (not cut at their sentences): {left_out} of {len(sentences)}\n")
    print("| | utterances (words) | batch | `cut` | `context` | another voice after |")
    print("|---|---|---|---|---|---|")
    for position, texts in found.items():
        words = sum(len(normalize(ref).split()) for ref, _ in texts["batch"])
        base = corpus_wer(texts["batch"])
        cells = [
            f"{corpus_wer(texts[v]):.3f} ({corpus_wer(texts[v]) / max(base, 1e-9):.2f}x)"
            if texts[v]
            else "-"
            for v in ("cut", "context", "other")
        ]
        print(
            f"| {position} | {len(texts['batch'])} ({words}) | {base:.3f} | "
            + " | ".join(cells)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_clip_set_arguments(parser)
    parser.add_argument("--variants", default="cut,pad-100,pad-350,prompt,left-context")
    parser.add_argument(
        "--model",
        default=BUNDLED_MODEL,
        help="a Whisper model: the bundled one, or one of [local.whisper_models] in TRANSCRIBE_CONFIG",
    )
    parser.add_argument(
        "--batch-spread",
        action="store_true",
        help="also batch with 10-100 ms more silence in front: its own spread",
    )
    parser.add_argument(
        "--by-position",
        action="store_true",
        help="also WER of each clip's first utterance and of the later ones (synthesized sets)",
    )
    parser.add_argument(
        "--calls",
        action="store_true",
        help="each voice's clips in turn as one session, a call (synthesized sets)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decode workers; with 2 or more a lone decode encodes on every core, as served",
    )
    args = parser.parse_args()
    clip_set = clip_set_of(args)
    clips, refs, groups = load_clips(clip_set)
    spoken = SPOKEN.get(clip_set, SYNTH_TURNS)
    sentences = {name: said for name, (_voice, said) in spoken.items()}
    if clip_set == "synth":
        sentences |= {name: (text,) for name, text in SYNTH.items()}
    if args.calls and clip_set != "recordings":
        clips, refs, groups, members = calls(clips, refs, spoken)
        # A call's sentences are its clips' in turn.
        sentences = {
            name: tuple(s for n in members.get(name, [name]) for s in sentences[n])
            for name in clips
        }
    engine = whisper_engine(args.model, args.workers)
    texts = {"batch": {n: engine.transcribe(a, final=True).text for n, a in clips.items()}}
    cuts = {n: utterances(a) for n, a in clips.items()}
    times: list[float] = []
    unrepeated: list[str] = []
    table = variants(engine, times, unrepeated)
    alone_at_once: dict[str, list[str]] = {}  # partials of finals decoded without a repeat
    redecoded: dict[str, int] = {}  # finals decoded alone again, per variant
    timed: dict[str, list[float]] = {}  # seconds each decode took, per variant
    for name in args.variants.split(","):
        before = engine.repeat_mismatches
        times.clear()
        unrepeated.clear()
        texts[name] = {n: table[name](a, cuts[n]) for n, a in clips.items()}
        redecoded[name] = engine.repeat_mismatches - before
        alone_at_once[name] = list(unrepeated)
        timed[name] = sorted(times)

    def wer(name: str, group: str) -> float:
        return corpus_wer([(refs[n], texts[name][n]) for n in groups[group]])

    words = {g: sum(len(refs[n].split()) for n in names) for g, names in groups.items()}
    print(f"## Final variants, {args.model}, {clip_set}\n")
    print(
        "| | "
        + " | ".join(f"{g} ({len(groups[g])} clips, {words[g]} words)" for g in groups)
        + " |"
    )
    print("|---" * (len(groups) + 1) + "|")
    for name in texts:
        cells = []
        for g in groups:
            ratio = wer(name, g) / max(wer("batch", g), 1e-9)
            cells.append(f"{wer(name, g):.3f}" + ("" if name == "batch" else f" ({ratio:.2f}x)"))
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, count in redecoded.items():
        if count:
            print(
                f"\n`{name}`: {count} decodes in context redone alone (the repeat read otherwise)"
            )
    for name, partials in alone_at_once.items():
        if partials:
            print(
                f"\n`{name}`: {len(partials)} finals decoded alone at once, their partials"
                " repeating themselves: " + "; ".join(repr(p[:40]) for p in partials)
            )
    # Wall time of each final's decode, one at a time: read as ratios between
    # variants of one run (the machine is shared).
    print(f"\n| decode per final (s, {args.workers} workers) | median | p95 |\n|---|---|---|")
    for name, spent in timed.items():
        if spent:
            print(f"| {name} | {statistics.median(spent):.3f} | {pct(spent, 0.95):.3f} |")
    if args.batch_spread:
        batch_spread(engine, clips, refs, groups)
    if args.by_position and clip_set != "recordings":
        # A clip's voice is in the set's table (SYNTH's sentences: en-us); a
        # call is one voice.
        voices = {n: spoken[n][0] if n in spoken else "en-us" if n in SYNTH else n for n in clips}
        by_position(engine, clips, cuts, sentences, voices)


if __name__ == "__main__":
    main()
