"""The public VoiceRun docs' Python client works against this server, changing only URL and key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_KEYS, GatewayProcess
from tests.textnorm import normalize

COMPAT_VENV = ROOT / ".venv-compat"
SCRIPT = Path(__file__).with_name("voicerun_docs_client.py")


@pytest.fixture(scope="session")
def websockets13_python() -> Path:
    """A Python with websockets 13 (the docs' ``extra_headers`` API); made once, then reused."""
    python = COMPAT_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import websockets; assert websockets.__version__.startswith('13.')",
    ]
    if not python.exists() or subprocess.run(check, capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(COMPAT_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "websockets==13.1"], check=True, timeout=300
        )
    subprocess.run(check, check=True)
    return python


def test_docs_python_client_prints_finals(
    gateway: GatewayProcess, websockets13_python: Path, shared_audio: Path, tmp_path: Path
) -> None:
    source = SCRIPT.read_text()
    script = source.replace('"wss://transcribe.voicerun.com"', f'"ws://127.0.0.1:{gateway.port}"')
    script = script.replace('"YOUR_API_KEY"', f'"{TEST_KEYS[0]}"')
    assert script.count("\n") == source.count("\n") and script != source
    (tmp_path / "client.py").write_text(script)
    shutil.copy(shared_audio / "goforward.raw", tmp_path / "audio.raw")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(websockets13_python), "client.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = run.stdout.splitlines()
    assert lines[0].startswith("Session: ts_"), run.stdout + run.stderr
    final_lines = [line.removeprefix("Final: ") for line in lines if line.startswith("Final: ")]
    assert normalize(" ".join(final_lines)) == "go forward ten meters", run.stdout
    # The example only listens after streaming, so the server's idle timeout ends the
    # session (session.closed, close 1000); the example's own "Step 5" then sends on a
    # closed socket, which websockets reports as a normal close, not a server fault.
    if run.returncode != 0:
        assert "ConnectionClosedOK" in run.stderr and "1000" in run.stderr, run.stderr
