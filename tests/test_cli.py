"""The ``transcribe-gateway`` command: config check and serve's start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


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
