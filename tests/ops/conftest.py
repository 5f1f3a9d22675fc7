"""Fixtures for operations tests: a real redis-server, the keys CLI, gateways with a store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT, GatewayProcess, free_port
from transcribe_gateway.server.limits import Grant
from transcribe_gateway.store.sqlite import open_database


@dataclass
class Live:
    """What the ops tick reads of a live Connection."""

    grant: Grant
    id: str
    closed: list[int] = field(default_factory=list)

    def terminate(self, code: int, error: str, message: str) -> None:
        self.closed.append(code)


# Sessions in these tests must outlive the shared fixture's 3 s idle timeout.
OPS_ENV = {"TRANSCRIBE_IDLE_TIMEOUT_S": "60", "TRANSCRIBE_STORE_RECHECK_INTERVAL_S": "0.5"}


class RedisServer:
    """``redis-server`` on a free port, in its own directory, persisting nothing."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            # The Redis tests must fail, not skip, where Redis cannot run (.ci/run installs it).
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = workdir / "redis.log"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited: {self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"redis-server did not answer on port {self.port}: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``transcribe-gateway <args>`` with ``env`` on top of the test environment."""
    return subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(env: dict[str, str], name: str, *options: str) -> str:
    done = run_cli(env, "keys", "create", name, *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def sqlite_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("store") / "keys.db"
    # Made now: the commands that only read refuse a store file that does not exist.
    open_database(path).close()
    return {"TRANSCRIBE_STORE_PATH": str(path)}


@pytest.fixture(scope="module")
def store_gateway(sqlite_env: dict[str, str]) -> Iterator[GatewayProcess]:
    """A gateway on a SQLite store that the CLI also writes to."""
    server = GatewayProcess("ops-sqlite", env={**OPS_ENV, **sqlite_env})
    yield server
    server.stop()
