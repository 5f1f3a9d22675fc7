"""Text normalization and word error rate for transcript tests and benchmarks.

References in ``../shared/audio/references.tsv`` are lower case, without
punctuation, numbers in words; engines write "10", "$200", "ill-disposed".
"""

from __future__ import annotations

import re
from pathlib import Path

import jiwer
from num2words import num2words

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"

_MONEY = re.compile(r"\$(\d+(?:\.\d+)?)")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalize(text: str) -> str:
    text = text.lower()
    text = _MONEY.sub(lambda m: f"{m.group(1)} dollars", text)
    text = _ORDINAL.sub(lambda m: num2words(int(m.group(1)), to="ordinal"), text)
    text = _NUMBER.sub(
        lambda m: " " + num2words(float(m.group()) if "." in m.group() else int(m.group())) + " ",
        text,
    )
    text = text.replace("-", " ").replace("mr.", "mister").replace("mrs.", "missus")
    text = re.sub(r"[^a-z' ]+", " ", text)
    text = text.replace("'", "")
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after normalization."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return (len(hyp.split()), 0)
    out = jiwer.process_words(ref, hyp or "<empty>")
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Word error rate over a set of (reference, hypothesis) pairs."""
    errors = total = 0
    for ref, hyp in pairs:
        e, n = word_errors(ref, hyp)
        errors += e
        total += n
    return errors / max(total, 1)


def references() -> dict[str, str]:
    """File name -> reference transcript (files with a reference only)."""
    path = SHARED_AUDIO / "references.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"shared audio missing: {path} (tests need ../shared beside the repo)"
        )
    out = {}
    for line in path.read_text().splitlines()[1:]:
        name, ref, *_ = line.split("\t")
        if ref.strip():
            out[name] = ref.strip()
    return out


LIBRIVOX = [n for n in references() if n.startswith("sense_and_sensibility")]
