"""Fixtures for the browser and Node tests: node_modules, a fake-microphone WAV, Chromium."""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

CLIENT_DIR = ROOT / "clients" / "js"
CHROMIUM = Path("/usr/bin/chromium")
# No first-run work, no background traffic, no QUIC: the browser reaches only the test server.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """clients/js/node_modules from the committed lock file (``npm ci`` once if missing)."""
    if shutil.which("node") is None:
        raise RuntimeError("these tests need Node.js (apt-get install nodejs npm)")
    modules = CLIENT_DIR / "node_modules"
    if not (modules / "ws" / "package.json").is_file():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=CLIENT_DIR, check=True, timeout=300
        )
    return modules


@pytest.fixture
def node_workdir(tmp_path: Path, node_modules: Path) -> Path:
    """A directory where ``import "ws"`` resolves, as in a user's project."""
    (tmp_path / "node_modules").symlink_to(node_modules)
    return tmp_path


def write_wav(path: Path, pcm: np.ndarray, rate: int = 16000, *, lead_s: float = 0.5) -> Path:
    """A mono pcm16 WAV: ``lead_s`` of silence, the speech, then 2 s of silence."""
    data = np.concatenate(
        [np.zeros(int(lead_s * rate), "<i2"), pcm.astype("<i2"), np.zeros(2 * rate, "<i2")]
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        raise RuntimeError("these tests need Debian's chromium (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(tmp_path: Path, chromium: Path) -> AsyncIterator[object]:
    """Launch Debian's Chromium through Playwright (never a downloaded browser).

    Yields a factory: ``await launch(wav)`` opens a browser whose fake
    microphone plays ``wav`` once.  ``bypass_csp`` (the default) lifts the demo
    page's Content-Security-Policy, which forbids what Playwright's polling
    waits do (evaluate strings); the demo's own test runs under it.
    """
    from playwright.async_api import BrowserContext, async_playwright

    async with async_playwright() as pw:
        launched: list[BrowserContext] = []

        async def launch(wav: Path, *, bypass_csp: bool = True) -> BrowserContext:
            profile = tmp_path / f"profile-{len(launched)}"
            profile.mkdir()
            context = await pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(chromium),
                headless=True,
                bypass_csp=bypass_csp,
                args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={wav}%noloop"],
            )
            launched.append(context)
            return context

        try:
            yield launch
        finally:
            for context in launched:
                await context.close()
