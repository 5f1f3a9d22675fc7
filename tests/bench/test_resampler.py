"""bench/resampler.py run small: a row per rate pair, and the upsampler holds less."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_table_shows_what_each_resampler_holds_back() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "resampler.py"), "--pushes", "20", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(
            r"^\| (\d+ -> \d+) \| ([\d.]+) / [\d.]+ \| ([\d.]+) / ", run.stdout, re.M
        )
    }
    assert set(rows) == {
        "8000 -> 16000",
        "8000 -> 24000",
        "16000 -> 24000",
        "44100 -> 16000",
        "48000 -> 16000",
    }, run.stdout
    soxr_held, held = rows["8000 -> 16000"]
    assert held < 13 < soxr_held  # the phone line's filter delay only, soxr's blocks
    assert rows["48000 -> 16000"][0] == rows["48000 -> 16000"][1]  # soxr for both
