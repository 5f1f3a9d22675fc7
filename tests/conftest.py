"""Shared fixtures: a real gateway process on a real port, and the shared audio."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
ARTIFACTS = ROOT / "test-artifacts"
TEST_KEYS = ("test-key-alpha-0123456789", "test-key-beta-9876543210")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``transcribe-gateway serve`` in a subprocess, logs captured to a file."""

    def __init__(
        self,
        name: str,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        *,
        own_group: bool = False,
    ):
        """``own_group``: in a process group of its own, as a shell starts a
        command (a terminal's Ctrl-C then signals the server and its children)."""
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.http = f"http://127.0.0.1:{self.port}"
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"server-{name}.log"
        # Each server gets a fresh store file (never the default ./transcribe-gateway.db).
        self.store_path = ARTIFACTS / f"store-{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.store_path}{suffix}").unlink(missing_ok=True)
        full_env = {
            **os.environ,
            "TRANSCRIBE_API_KEYS": ",".join(TEST_KEYS),
            "TRANSCRIBE_AUTH_TIMEOUT_S": "1.5",
            "TRANSCRIBE_IDLE_TIMEOUT_S": "3",
            "TRANSCRIBE_LOCAL_ALLOW_DOWNLOADS": "false",
            "TRANSCRIBE_DRAIN_TIMEOUT_S": "5",
            # Room for the 20-concurrent-sessions test on a 2-core machine (default: 8 per core).
            "TRANSCRIBE_LOCAL_MAX_SESSIONS_PER_WORKER": "12",
            "TRANSCRIBE_PLUGINS": "tests.plugins.faulty:FaultySTT",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "TRANSCRIBE_STORE_PATH": str(self.store_path),
            **(env or {}),
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transcribe_gateway",
                "serve",
                "--port",
                str(self.port),
                *(args or []),
            ],
            env=full_env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log_path.read_text()}")
            try:
                if self.health()["ready"]:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.log_path.read_text()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http}/healthz", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def metric(self, sample: str) -> float | None:
        """One sample of ``/metrics``, named as exposed (``name{labels}``); None if absent."""
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="session")
def gateway() -> Iterator[GatewayProcess]:
    """The shared server: test keys, short auth (1.5 s) and idle (3 s) timeouts."""
    server = GatewayProcess("main")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_audio() -> Path:
    if not (SHARED_AUDIO / "references.tsv").is_file():
        raise FileNotFoundError(f"{SHARED_AUDIO} is missing: tests need ../shared beside the repo")
    return SHARED_AUDIO
