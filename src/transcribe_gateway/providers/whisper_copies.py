"""Reading a final decoded in context: the words of its two copies.

A final's window holds the utterance twice
(:func:`~transcribe_gateway.providers.whisper_engine.in_context`); the final
is the first copy's words, trusted only if the repeat reads the same (or
reads as nothing: Whisper stopped after the first copy).
Whisper's word timings are what splits the two, and they drift beside a
silence, so the split is checked by the words too.  An utterance that says
the same words twice in a row is not decoded twice (:func:`repeats_itself`).
"""

from __future__ import annotations

import re
from typing import Any

from transcribe_gateway.audio.vad import SAMPLE_RATE


def _middle(word: Any) -> float:
    """Where a faster-whisper word lies, in samples of its window."""
    return float((word.start + word.end) / 2 * SAMPLE_RATE)


def copies(words: list[Any], keep_from: int, keep_to: int) -> tuple[list[Any], list[Any]] | None:
    """The words Whisper read in the first copy of the utterance and in its repeat
    (``in_context``), from the window's ``words``, if the two read alike
    (:func:`_read_alike`); None if they do not.

    By time, they are the words in ``[keep_from, keep_to)`` and after it.  But the
    timing is Whisper's, and a word beside a silence drifts into it: the first
    copy's last word past the middle of the gap ("sound better to" / "me sound
    better to me"), or its first word back before ``keep_from``.  So a split one
    word either way that reads as the same words twice wins over the timed one;
    it spares such a final a second decode (5 of 11 held-out finals whose
    readings seemed to disagree; BENCHMARKS.md, *Copies split by their words*).
    A first copy read in place with nothing read after it is kept as both
    readings (the repeat read as nothing: Whisper stopped early).  A window
    read as nothing at all is two empty readings (noise); but words read in
    the context and none after it are None: Whisper stopped before the
    utterance, which decoded alone reads ("go forward" after jfk).
    """
    said = [w for w in words if _said(w)]
    if not said:
        # Nothing read in the whole window: noise, read as nothing. Decoded alone,
        # Whisper would make words of it ("Thank you.").
        return [], []
    timed = (
        [w for w in said if keep_from <= _middle(w) < keep_to],
        [w for w in said if _middle(w) >= keep_to],
    )
    if any(timed) and _read_alike(*timed):
        return timed
    start = sum(1 for w in said if _middle(w) < keep_from)
    split = len(said) - len(timed[1])
    for at in (split, split + 1, split - 1):
        first_from = 2 * at - len(said)  # two copies of equal length end the window
        if 0 <= first_from < at and abs(first_from - start) <= 1:
            pair = said[first_from:at], said[at:]
            if _read_alike(*pair):
                return pair
    first, repeat = timed
    if first and not repeat and _aligned(first):
        # Whisper read the utterance and stopped: nothing for the repeat (tiny.en
        # ends early after a short one: "Sorry", "and so", "Yes, please"). There
        # is no second reading to compare, but nothing contradicts the first, and
        # decoding the utterance again alone read the same words in all six such
        # finals of the synthesized sets, for one whole-window decode more
        # (BENCHMARKS.md, *A repeat read as nothing*).
        return first, first
    return None


def _aligned(words: list[Any]) -> bool:
    """Whisper kept its place in the audio for these words.  A decode that skipped
    a repetition times what it is left with at one instant: several words with no
    duration (one such word happens at a segment's end; no final of
    BENCHMARKS.md's sets has two)."""
    return sum(1 for w in words if w.end <= w.start) < 2


def _read_alike(first: list[Any], repeat: list[Any]) -> bool:
    """Two readings of one utterance agree: the same words, and Whisper kept its
    place in the audio for both (:func:`_aligned`)."""
    return _aligned(first) and _aligned(repeat) and [*map(_said, first)] == [*map(_said, repeat)]


def repeats_itself(text: str) -> bool:
    """``text`` says a word or a phrase of up to three words twice in a row ("No,
    no"; "Thank you, thank you").  Such an utterance and its repeat make a run
    of the same words in one window, which Whisper miscounts ("thank you" three
    times for four) or loops on ("No, no, no" and its repeat read as a hundred
    "no"s, until the token budget stops it): the copies disagree, and the
    utterance is decoded alone after all, one decode later (BENCHMARKS.md,
    *Utterances that repeat themselves*)."""
    said = re.sub(r"[^\w'\s]", " ", text.lower()).split()
    return any(
        said[i : i + n] == said[i + n : i + 2 * n]
        for n in (1, 2, 3)
        for i in range(len(said) - 2 * n + 1)
    )


def _said(word: Any) -> str:
    """A faster-whisper word as said, for comparing two decodes: no case, no punctuation."""
    return re.sub(r"[^\w']", "", word.word.lower())


def ending(word: str, like: str) -> str:
    """``word`` with the punctuation ``like`` ends with instead of its own."""

    def stem(word: str) -> str:
        return re.sub(r"[^\w']+$", "", word)

    return stem(word) + like[len(stem(like)) :]
