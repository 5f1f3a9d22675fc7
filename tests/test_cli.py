"""The ``transcribe-gateway`` command: config check, serve's start-up errors and banner."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transcribe_gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


def test_config_check_accepts_a_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 9100\napi_keys = ["k1"]\n[local]\nworkers = 2\n')
    result = run("config", "check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "port 9100" in result.stdout


def test_config_check_names_the_bad_setting(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[local]\nworkers = "many"\n')
    result = run("config", "check", "--config", str(config))
    assert result.returncode == 2
    assert "local.workers" in result.stderr


def test_serve_refuses_production_without_keys(tmp_path: Path) -> None:
    result = run("serve", "--profile", "production", "--port", "0")
    assert result.returncode == 2
    assert "api_keys" in result.stderr


def test_config_check_refuses_what_serve_refuses(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('profile = "production"\n')
    env = {k: v for k, v in os.environ.items() if k != "TRANSCRIBE_API_KEYS"}
    result = run("config", "check", "--config", str(config), env=env)
    assert result.returncode == 2
    assert "api_keys" in result.stderr


def start_serve(tmp_path: Path, **env_vars: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    """``serve`` on a free port, read up to its banner's URL line: (process, port, lines)."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSCRIBE_LOCAL_ALLOW_DOWNLOADS": "false",
        "TRANSCRIBE_STORE_PATH": str(tmp_path / "store.db"),
    }
    env.pop("TRANSCRIBE_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "transcribe_gateway", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**env, **env_vars},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:  # ends if it exits; pytest-timeout bounds a hang
        seen.append(line)
        if "WebSocket URL" in line:
            break
    return proc, port, seen


def run_suggested(line: str, key: str) -> subprocess.CompletedProcess[str]:
    """Run the banner's ``try`` command as printed (plus --fast), TRANSCRIBE_API_KEY=key."""
    command = shlex.split(line.split("try ", 1)[1].split("  (", 1)[0])
    assert command[:2] == ["transcribe-gateway", "stream"], line
    return run(*command[1:], "--fast", env={**os.environ, "TRANSCRIBE_API_KEY": key})


def test_serve_prints_its_banner_once_it_accepts_connections(tmp_path: Path) -> None:
    # The banner says what to try; a user who tries it at once must not be refused
    # while the model still loads.
    proc, port, seen = start_serve(tmp_path)
    try:
        assert proc.stderr is not None
        assert any("WebSocket URL" in line for line in seen), "".join(seen)
        # Connected at once, no retry: the banner comes after the socket is bound.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert any("local engine ready" in line for line in seen), "".join(seen)
        rest = [proc.stderr.readline() for _ in range(3)]
        assert "development key: dev-key" in rest[0]
        assert f"stream --url ws://localhost:{port}/ws --key dev-key " in rest[1]
        assert "demo page" in rest[2]
        # It works as printed, even where another server's key is in the environment.
        tried = run_suggested(rest[1], "another-servers-key")
        assert tried.returncode == 0, tried.stderr
        assert "country" in tried.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_banner_with_configured_keys_names_the_key_variable(tmp_path: Path) -> None:
    # With keys configured the suggested command needs one: the banner says where the
    # command reads it (it never prints a configured key).
    secret = "configured-key-0123456789"
    proc, _, seen = start_serve(tmp_path, TRANSCRIBE_API_KEYS=secret)
    try:
        assert proc.stderr is not None
        assert any("WebSocket URL" in line for line in seen), "".join(seen)
        suggested = proc.stderr.readline()
        assert "try  transcribe-gateway stream" in suggested
        assert "with TRANSCRIBE_API_KEY set to one of your api_keys" in suggested
        assert secret not in "".join(seen) + suggested
        tried = run_suggested(suggested, secret)
        assert tried.returncode == 0, tried.stderr
        assert "country" in tried.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)
