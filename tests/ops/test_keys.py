"""Keys in the store: the CLI, hashing at rest, revocation and expiry (SQLite backend)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
import websockets

from tests.conftest import GatewayProcess, free_port
from tests.ops.conftest import create_key, run_cli
from tests.server.wsutil import connect, recv
from transcribe_gateway.store.keys import hash_key
from transcribe_gateway.store.sqlite import open_database


class TestKeysCli:
    def test_cli_create_prints_the_key_once_and_stores_only_its_hash(self, tmp_path: Path) -> None:
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        done = run_cli(env, "keys", "create", "acme", "--max-sessions", "3", "--rate", "50")
        assert done.returncode == 0, done.stderr
        secret = done.stdout.strip()
        assert secret.startswith("tgk_") and len(secret) > 40
        assert "shown only once" in done.stderr
        db = sqlite3.connect(tmp_path / "k.db")
        rows = db.execute("SELECT name, key_hash FROM keys").fetchall()
        db.close()
        assert rows == [("acme", hash_key(secret))]
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("k.db*"))
        assert secret.encode() not in raw
        listing = run_cli(env, "keys", "list")
        assert listing.returncode == 0
        assert "acme" in listing.stdout and "active" in listing.stdout
        assert secret not in listing.stdout and hash_key(secret) not in listing.stdout

    def test_cli_refuses_a_duplicate_name(self, tmp_path: Path) -> None:
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        create_key(env, "dup")
        again = run_cli(env, "keys", "create", "dup")
        assert again.returncode == 1
        assert "exists already" in again.stderr
        assert again.stdout == ""

    def test_cli_revoke_marks_the_key_revoked(self, tmp_path: Path) -> None:
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        create_key(env, "gone")
        assert run_cli(env, "keys", "revoke", "gone").returncode == 0
        assert "revoked" in run_cli(env, "keys", "list").stdout
        # A second revoke, or an unknown name, is an error.
        assert run_cli(env, "keys", "revoke", "gone").returncode == 1
        assert run_cli(env, "keys", "revoke", "nobody").returncode == 1

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("--max-sessions", "-1"),  # the key could never connect
            ("--max-sessions", "99999999999999999999"),  # over SQLite's INTEGER
            ("--audio-minutes", "-5"),
            ("--audio-minutes", "nan"),  # was reported as "exists already"
            ("--audio-minutes", "inf"),
            ("--rate", "-1"),
            ("--rate", "nan"),
            ("--rate", "0.5"),  # counted per second: would let one message a second through
            ("--rate", "2.5"),
            ("--expires-in", "inf"),  # then `keys list` crashed on the whole store
            ("--expires-in", "1e300"),
            ("--expires-in", "nan"),
            ("--expires-in", "0"),
            ("--expires-in", "-1"),
        ],
    )
    def test_cli_refuses_a_bad_limit_and_creates_nothing(
        self, tmp_path: Path, option: str, value: str
    ) -> None:
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        open_database(tmp_path / "k.db").close()  # a store there already (`keys list` needs it)
        done = run_cli(env, "keys", "create", "bad", option, value)
        assert done.returncode == 2, done.stderr
        assert option in done.stderr and "exists already" not in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""
        listing = run_cli(env, "keys", "list")
        assert listing.returncode == 0, listing.stderr
        assert "bad" not in listing.stdout

    def test_cli_refuses_a_name_that_looks_like_a_key_id(self, tmp_path: Path) -> None:
        # `keys revoke X` and `usage --key X` take a name or an id: X must be one key.
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        done = run_cli(env, "keys", "create", "key_0123456789ab")
        assert done.returncode == 2, done.stderr
        assert "looks like a key id" in done.stderr and done.stdout == ""

    def test_cli_takes_a_whole_rate(self, tmp_path: Path) -> None:
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        create_key(env, "whole", "--rate", "2.0")
        assert run_cli(env, "keys", "list").stdout.splitlines()[1].split()[8] == "2"

    @pytest.mark.parametrize(
        "command",
        [("keys", "list"), ("keys", "revoke", "acme"), ("usage",), ("usage", "--key", "acme")],
    )
    def test_cli_commands_that_read_refuse_a_missing_store_file(
        self, tmp_path: Path, command: tuple[str, ...]
    ) -> None:
        # A mistyped store.path: an error, not an empty store created there.
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "typo" / "k.db")}
        done = run_cli(env, *command)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"transcribe-gateway: store.path: {tmp_path / 'typo' / 'k.db'} does not exist "
            "(no key was created there; check store.path / TRANSCRIBE_STORE_PATH)"
        ]
        assert not (tmp_path / "typo").exists()

    @pytest.mark.parametrize(
        "command", [("keys", "create", "acme"), ("keys", "list"), ("usage", "--key", "acme")]
    )
    def test_cli_says_in_one_line_that_redis_is_unavailable(self, command: tuple[str, ...]) -> None:
        env = {
            "TRANSCRIBE_STORE_BACKEND": "redis",
            "TRANSCRIBE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
        }
        done = run_cli(env, *command)
        assert done.returncode == 1, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("transcribe-gateway: store unavailable: ")
        assert done.stdout == ""

    def test_cli_says_in_one_line_that_the_sqlite_file_is_locked(self, tmp_path: Path) -> None:
        # Another process holds the write lock past the 5 s busy timeout.
        path = tmp_path / "k.db"
        env = {"TRANSCRIBE_STORE_PATH": str(path)}
        create_key(env, "acme")
        lock = sqlite3.connect(path, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            done = run_cli(env, "keys", "revoke", "acme")
            listing = run_cli(env, "keys", "list")  # reads go on (WAL)
        finally:
            lock.close()
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines() == [
            f"transcribe-gateway: store unavailable: database is locked ({path})"
        ]
        assert listing.returncode == 0 and "active" in listing.stdout

    def test_cli_list_shows_a_bad_stored_value_instead_of_failing(self, tmp_path: Path) -> None:
        # Written before the CLI refused such values (or by hand): the listing of the
        # whole store must not fail on one key.
        env = {"TRANSCRIBE_STORE_PATH": str(tmp_path / "k.db")}
        create_key(env, "forever")
        create_key(env, "fine")
        db = sqlite3.connect(tmp_path / "k.db")
        db.execute(
            "UPDATE keys SET expires_at = ?, audio_minutes = ? WHERE name = 'forever'",
            (float("inf"), float("inf")),
        )
        db.commit()
        db.close()
        listing = run_cli(env, "keys", "list")
        assert listing.returncode == 0, listing.stderr
        assert "forever" in listing.stdout and "fine" in listing.stdout


async def _refused(url: str, key: str) -> tuple[int | None, list[dict[str, object]]]:
    ws = await connect(url, key)
    got: list[dict[str, object]] = []
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            got.append(await recv(ws, 5))
    return ws.close_code, got


class TestStoredKeys:
    async def test_created_key_opens_a_session(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "opens")
        async with await connect(store_gateway.url, key) as ws:
            assert (await recv(ws, 5))["type"] == "session.created"
        assert key not in store_gateway.logs()

    async def test_revoked_key_is_refused_and_its_open_session_closed(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "revoked-live")
        ws = await connect(store_gateway.url, key)
        assert (await recv(ws, 5))["type"] == "session.created"
        assert run_cli(sqlite_env, "keys", "revoke", "revoked-live").returncode == 0
        revoked_at = time.monotonic()
        # New sessions: refused at once.
        code, _ = await _refused(store_gateway.url, key)
        assert code == 4001
        # The open one: an error, then 4001, within seconds.
        error = await recv(ws, 10)
        assert error["type"] == "error"
        assert error["error"]["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws, 5)
        assert ws.close_code == 4001
        assert time.monotonic() - revoked_at < 5

    async def test_expired_key_is_refused(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        # 0.00002 days = 1.7 s
        key = create_key(sqlite_env, "short-lived", "--expires-in", "0.00002")
        async with await connect(store_gateway.url, key) as ws:
            assert (await recv(ws, 5))["type"] == "session.created"
            # The open session is closed when the key expires, like a revocation.
            error = await recv(ws, 10)
            assert error["error"]["code"] == "unauthorized"
            assert "expired" in error["error"]["message"]
        code, _ = await _refused(store_gateway.url, key)
        assert code == 4001

    async def test_key_without_transcribe_scope_cannot_stream(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "usage-only", "--scope", "usage")
        code, got = await _refused(store_gateway.url, key)
        assert code == 4001
        assert [m["error"]["code"] for m in got] == ["forbidden"]  # type: ignore[index]

    async def test_static_keys_still_work_beside_the_store(
        self, store_gateway: GatewayProcess
    ) -> None:
        async with await connect(store_gateway.url) as ws:
            assert (await recv(ws, 5))["type"] == "session.created"

    async def test_log_never_contains_a_key(
        self, store_gateway: GatewayProcess, sqlite_env: dict[str, str]
    ) -> None:
        key = create_key(sqlite_env, "quiet")
        async with await connect(store_gateway.url, key) as ws:
            await recv(ws, 5)
        await asyncio.sleep(0.3)
        logs = store_gateway.logs()
        assert key not in logs and hash_key(key) not in logs
        for line in logs.splitlines():
            if line.startswith("{"):
                assert "tgk_" not in json.dumps(json.loads(line))
