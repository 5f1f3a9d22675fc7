"""The ``transcribe-gateway`` command: config check, serve's start-up errors and banner."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tests.conftest import ROOT, free_port
from transcribe_gateway import cli
from transcribe_gateway.config import Settings, StoreSettings
from transcribe_gateway.exceptions import ConfigError
from transcribe_gateway.server import runner


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


def start_serve(
    tmp_path: Path, *, port: int | None = None, **env_vars: str
) -> tuple[subprocess.Popen[str], int, list[str]]:
    """``serve`` on ``port`` (default: a free one), read up to its banner's URL line:
    (process, port, lines)."""
    port = free_port() if port is None else port
    env = quiet_env(tmp_path)
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


def quiet_env(tmp_path: Path, **env_vars: str) -> dict[str, str]:
    """The test's environment, offline, on a store in ``tmp_path``, plus ``env_vars``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSCRIBE_LOCAL_ALLOW_DOWNLOADS": "false",
        "TRANSCRIBE_STORE_PATH": str(tmp_path / "store.db"),
    }
    return {**env, **env_vars}


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("x")
    return str(tmp_path / "a-file" / "sub" / "store.db")


def _not_a_database(tmp_path: Path) -> str:
    (tmp_path / "notes.db").write_text("these are not the droids\n" * 10)
    return str(tmp_path / "notes.db")


BAD_SETTINGS: dict[str, tuple[Callable[[Path], dict[str, str]], str]] = {
    "redis-url": (
        lambda _: {"TRANSCRIBE_STORE_BACKEND": "redis", "TRANSCRIBE_REDIS_URL": "htp://x"},
        "store.redis_url",
    ),
    "store-path-is-a-directory": (lambda p: {"TRANSCRIBE_STORE_PATH": str(p)}, "store.path"),
    "store-path-cannot-be-created": (
        lambda p: {"TRANSCRIBE_STORE_PATH": _under_a_file(p)},
        "store.path",
    ),
    "store-path-not-a-database": (
        lambda p: {"TRANSCRIBE_STORE_PATH": _not_a_database(p)},
        "store.path",
    ),
    "default-model": (lambda _: {"TRANSCRIBE_LOCAL_DEFAULT_MODEL": "nope"}, "local.default_model"),
    "default-model-path": (
        lambda tmp: {"TRANSCRIBE_LOCAL_DEFAULT_MODEL": f"whisper-{tmp}"},
        "local.default_model",
    ),
    "plugin": (lambda _: {"TRANSCRIBE_PLUGINS": "nosuchmod:Foo"}, "plugins"),
    # A plugin whose __init__ raises, that has no name, or that claims LOCAL: a
    # traceback and exit 1 (LOCAL: every substituted session broken), and
    # "configuration OK" from config check.
    "plugin-init-raises": (
        lambda _: {"TRANSCRIBE_PLUGINS": "tests.plugins.broken:InitRaises"},
        "plugins",
    ),
    "plugin-without-a-name": (
        lambda _: {"TRANSCRIBE_PLUGINS": "tests.plugins.broken:NoName"},
        "plugins",
    ),
    "plugin-claims-local": (
        lambda _: {"TRANSCRIBE_PLUGINS": "tests.plugins.broken:ClaimsLocal"},
        "plugins",
    ),
    "blank-api-key": (lambda p: {"TRANSCRIBE_CONFIG": _blank_key_config(p)}, "api_keys"),
    # Imports that raise other than ImportError: a traceback and exit 1.
    "plugin-syntax-error": (
        lambda p: {"PYTHONPATH": _module(p, "badsyntax", "def broken(:\n"), **_plugin("badsyntax")},
        "plugins: cannot load 'badsyntax:X': SyntaxError",
    ),
    "plugin-import-raises": (
        lambda p: {
            "PYTHONPATH": _module(p, "badinit", 'raise RuntimeError("needs FOO_TOKEN")\n'),
            **_plugin("badinit"),
        },
        "plugins: cannot load 'badinit:X': RuntimeError: needs FOO_TOKEN",
    ),
    "plugin-relative-name": (
        lambda _: {"TRANSCRIBE_PLUGINS": ".rel:X"},
        "plugins: cannot load '.rel:X': TypeError",
    ),
    # Accepted, never read: DEEPGRAM sessions quietly served by LOCAL instead.
    "misspelt-provider-table": (
        lambda p: {"TRANSCRIBE_CONFIG": _config(p, '[providers.deepgramm]\napi_key = "k"\n')},
        "providers.DEEPGRAMM: no provider DEEPGRAMM",
    ),
    # uvloop cannot be imported (Windows, not installed): serve died with a traceback.
    "uvloop-missing": (
        lambda p: {
            "PYTHONPATH": _module(p, "uvloop", 'raise ImportError("no uvloop (simulated)")\n'),
            "TRANSCRIBE_EVENT_LOOP": "uvloop",
        },
        'event_loop: "uvloop" cannot be imported',
    ),
}


def _module(tmp_path: Path, name: str, text: str) -> str:
    """A directory for PYTHONPATH holding module ``name`` with source ``text``."""
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(text)
    return str(folder)


def _plugin(module: str) -> dict[str, str]:
    return {"TRANSCRIBE_PLUGINS": f"{module}:X"}


def _config(tmp_path: Path, text: str) -> str:
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    return str(config)


def _blank_key_config(tmp_path: Path) -> str:
    config = tmp_path / "gateway.toml"
    config.write_text('profile = "production"\napi_keys = [""]\n')
    return str(config)


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_config_check_and_serve_refuse_with_one_line_naming_the_setting(
    tmp_path: Path, case: str
) -> None:
    # What serve cannot start with, config check refuses too; serve says it in one
    # line naming the setting (no traceback), before it listens.
    make, setting = BAD_SETTINGS[case]
    env = quiet_env(tmp_path, **make(tmp_path))
    checked = run("config", "check", env=env)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert f"configuration error: {setting}" in checked.stderr
    served = run("serve", "--port", str(free_port()), env=env)
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
    assert (
        served.stderr.strip()
        .splitlines()[-1]
        .startswith(f"transcribe-gateway: configuration error: {setting}")
    ), served.stderr


def test_serve_names_a_default_model_whose_weights_are_missing(tmp_path: Path) -> None:
    # A name config check accepts (a faster-whisper model), but whose weights are
    # not on this machine with downloads off: serve says so, no traceback.
    env = quiet_env(tmp_path, TRANSCRIBE_LOCAL_DEFAULT_MODEL="whisper-base.en")
    assert run("config", "check", env=env).returncode == 0
    served = run("serve", "--port", str(free_port()), env=env)
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr
    assert "configuration error: local.default_model" in served.stderr


def test_config_check_warns_of_an_unknown_transcribe_variable(tmp_path: Path) -> None:
    env = quiet_env(tmp_path, TRANSCRIBE_IDLE_TIMEOUT="5", TRANSCRIBE_URL="ws://x/ws")
    checked = run("config", "check", env=env)
    assert checked.returncode == 0, checked.stderr  # a warning, not an error
    assert "warning: TRANSCRIBE_IDLE_TIMEOUT is not a transcribe-gateway setting" in (
        checked.stderr
    )
    assert "did you mean TRANSCRIBE_IDLE_TIMEOUT_S?" in checked.stderr
    assert "TRANSCRIBE_URL" not in checked.stderr  # the stream client's own
    assert "TRANSCRIBE_STORE_PATH" not in checked.stderr


def test_serve_warns_of_an_unknown_variable_and_brackets_an_ipv6_host(tmp_path: Path) -> None:
    proc, port, seen = start_serve(tmp_path, TRANSCRIBE_HOST="::1", TRANSCRIBE_IDLE_TIMEOUT="5")
    try:
        assert proc.stderr is not None
        text = "".join(seen)
        assert "TRANSCRIBE_IDLE_TIMEOUT is not a transcribe-gateway setting" in text
        assert f"WebSocket URL ws://[::1]:{port}/ws" in seen[-1], text
        rest = [proc.stderr.readline() for _ in range(3)]
        assert f"stream --url ws://[::1]:{port}/ws --key dev-key " in rest[1]
        assert f"demo page http://[::1]:{port}/" in rest[2]
        tried = run_suggested(rest[1], "another-servers-key")
        assert tried.returncode == 0, tried.stderr
        assert "country" in tried.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_plugin_failing_to_initialise_is_named_in_one_line(tmp_path: Path) -> None:
    env = quiet_env(tmp_path, TRANSCRIBE_PLUGINS="tests.plugins.broken:InitRaises")
    for command in (["config", "check"], ["serve", "--port", str(free_port())]):
        result = run(*command, env=env)
        assert result.returncode == 2, result.stderr
        (line,) = [x for x in result.stderr.splitlines() if "configuration error" in x]
        # The plugin's own two-line message, on the one line.
        assert "tests.plugins.broken:InitRaises" in line, result.stderr
        assert "INITBAD_API_KEY is not set (a second line)" in line, result.stderr


def checked(tmp_path: Path, **fields: Any) -> Settings:
    """``cli._checked`` (as ``config check``) on settings with a store in ``tmp_path``."""
    store = StoreSettings(path=str(tmp_path / "store.db"))
    return cli._checked(Settings(store=store, **fields))


def test_a_provider_table_must_name_a_provider_of_this_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        checked(tmp_path, providers={"OPEN_AI": {"api_key": "k"}})
    assert str(caught.value).startswith("providers.OPEN_AI: no provider OPEN_AI"), caught.value
    assert "did you mean [providers.OPENAI]?" in str(caught.value)
    assert "\n" not in str(caught.value)
    # Far from any name: no guess, the names there are.
    with pytest.raises(ConfigError, match=r"known: CARTESIA, DEEPGRAM, ") as caught:
        checked(tmp_path, providers={"ZZZ": {"api_key": "k"}})
    assert "did you mean" not in str(caught.value)
    # LOCAL reads no table (its settings are [local]).
    with pytest.raises(ConfigError, match=r"^providers\.LOCAL: .*\[local\]"):
        checked(tmp_path, providers={"LOCAL": {"api_key": "k"}})
    # The catalog's, and a plugin's, under the name it serves as ("lowered": LOWERED).
    checked(
        tmp_path,
        plugins=["tests.plugins.broken:LowerCase"],
        providers={"DEEPGRAM": {"api_key": "k"}, "LOWERED": {"base_url": "ws://x"}},
    )


def test_a_missing_uvloop_is_named_only_when_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    with pytest.raises(ConfigError, match=r'^event_loop: "uvloop" cannot be imported'):
        checked(tmp_path, event_loop="uvloop")
    checked(tmp_path, event_loop="auto")  # uvicorn falls back to asyncio


def test_serve_names_an_unreachable_redis_in_one_line_without_its_password(
    tmp_path: Path,
) -> None:
    # It printed a 50-line traceback and exited 3, after the models loaded.
    port = free_port()  # nothing listens there
    env = quiet_env(
        tmp_path,
        TRANSCRIBE_STORE_BACKEND="redis",
        TRANSCRIBE_REDIS_URL=f"redis://:hunter2-secret@127.0.0.1:{port}/0",
    )
    checked = run("config", "check", env=env)
    assert checked.returncode == 0, checked.stderr  # offline: Redis is not asked
    served = run("serve", "--port", str(free_port()), env=env)
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
    assert "hunter2" not in served.stderr
    (line,) = served.stderr.strip().splitlines()
    assert line.startswith(
        f"transcribe-gateway: configuration error: store.redis_url: Redis at 127.0.0.1:{port} "
        "does not answer: "
    ), line


def test_a_redis_that_never_answers_is_given_up_on_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "REDIS_CHECK_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts, never replies
        port = mute.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"^store\.redis_url: Redis at .* does not answer"):
            checked_redis = Settings(
                store=StoreSettings(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0")
            )
            cli._checked(checked_redis, serving=True)
        assert time.monotonic() - started < 3  # one try, bounded by the timeout


def _no_engine_loaded(stderr: str) -> bool:
    return "loaded whisper model" not in stderr and "local engine ready" not in stderr


def test_serve_on_a_port_in_use_stops_before_loading_the_models(tmp_path: Path) -> None:
    # It exited 3 once the models had loaded (minutes on a cold cache), naming no setting.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = quiet_env(tmp_path)
        assert run("config", "check", env=env).returncode == 0  # the server may be up
        served = run("serve", "--port", str(port), env=env)
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
    assert _no_engine_loaded(served.stderr), served.stderr
    assert served.stderr.strip().splitlines()[-1] == (
        f"transcribe-gateway: configuration error: port: 127.0.0.1:{port} is already in use "
        "(another server?); pick another port (TRANSCRIBE_PORT, serve --port)"
    )


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("not a host!!", "host: cannot resolve 'not a host!!': "),
        ("192.0.2.1", "host: cannot listen on 192.0.2.1:"),  # TEST-NET-1: nobody's address
    ],
)
def test_serve_on_a_bad_host_stops_before_loading_the_models(
    tmp_path: Path, host: str, says: str
) -> None:
    served = run("serve", "--host", host, "--port", str(free_port()), env=quiet_env(tmp_path))
    assert served.returncode == 2, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
    assert _no_engine_loaded(served.stderr), served.stderr
    last = served.stderr.strip().splitlines()[-1]
    assert last.startswith(f"transcribe-gateway: configuration error: {says}"), last
    assert last.endswith("(TRANSCRIBE_HOST, serve --host)"), last


async def test_a_port_taken_before_listening_is_one_line_and_status_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bound early with SO_REUSEADDR, the socket listens only once the models are
    # loaded: a second gateway started meanwhile on the port listens first.
    server = runner.build_server(Settings(store=StoreSettings(path=str(tmp_path / "s.db"))))
    shut: list[bool] = []

    class Lifespan:
        async def shutdown(self) -> None:
            shut.append(True)

    async def startup(self: object, sockets: object = None) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(uvicorn.Server, "startup", startup)
    server.lifespan = Lifespan()  # type: ignore[assignment]
    with pytest.raises(SystemExit) as exited:
        await server.startup(sockets=[])
    assert exited.value.code == 3
    assert shut == [True]  # the engines closed, as uvicorn does on its own bind failure


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_all_ipv6_addresses_advertises_a_url_that_connects(tmp_path: Path) -> None:
    # "::" listens on IPv6 only; the banner said localhost, which may be IPv4 only.
    proc, _, seen = start_serve(
        tmp_path, port=0, TRANSCRIBE_HOST="::", TRANSCRIBE_LOCAL_WORKERS="1"
    )
    try:
        url = urllib.parse.urlsplit(seen[-1].split("WebSocket URL ", 1)[1].strip())
        assert url.hostname is not None and url.port is not None, "".join(seen)
        socket.create_connection((url.hostname, url.port), timeout=5).close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_on_port_0_advertises_the_port_it_listens_on(tmp_path: Path) -> None:
    # The banner said ws://localhost:0/ws.
    proc, _, seen = start_serve(tmp_path, port=0, TRANSCRIBE_LOCAL_WORKERS="1")
    try:
        assert proc.stderr is not None
        url = seen[-1].split("WebSocket URL ", 1)[1].strip()
        assert url.startswith("ws://localhost:") and url.endswith("/ws"), "".join(seen)
        port = int(url.removeprefix("ws://localhost:").removesuffix("/ws"))
        assert port != 0, "".join(seen)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        rest = [proc.stderr.readline() for _ in range(3)]
        assert f"--url ws://localhost:{port}/ws " in rest[1]
        assert f"demo page http://localhost:{port}/ " in rest[2]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
