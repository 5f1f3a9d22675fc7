"""The ``[store]`` settings: validated at start, naming the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ops.conftest import run_cli
from transcribe_gateway.config import load_settings
from transcribe_gateway.exceptions import ConfigError


def test_config_redis_backend_needs_a_url() -> None:
    done = run_cli({"TRANSCRIBE_STORE_BACKEND": "redis"}, "config", "check")
    assert done.returncode == 2
    assert "store.redis_url" in done.stderr


def test_config_store_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[store]\nbackend = "redis"\nredis_url = "redis://a:6379/0"\nlease_ttl_s = 9\n')
    settings = load_settings(path, environ={"TRANSCRIBE_REDIS_URL": "redis://b:6379/1"})
    assert settings.store.backend == "redis"
    assert settings.store.redis_url == "redis://b:6379/1"  # env wins
    assert settings.store.lease_ttl_s == 9
    assert load_settings(environ={}).store.path == "./transcribe-gateway.db"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRANSCRIBE_STORE_BACKEND": "postgres"}, "store.backend"),
        ({"TRANSCRIBE_STORE_LEASE_TTL_S": "0"}, "store.lease_ttl_s"),
        ({"TRANSCRIBE_STORE_RECHECK_INTERVAL_S": "soon"}, "TRANSCRIBE_STORE_RECHECK_INTERVAL_S"),
    ],
)
def test_config_bad_store_setting_is_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(environ=env)
