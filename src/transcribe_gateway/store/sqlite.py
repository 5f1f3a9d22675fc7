"""The default store: one SQLite file for keys, usage and used session tokens, live state
in memory.

Meant for one gateway process per file (one box).  The ``keys`` and ``usage``
commands may use the same file while the gateway runs (WAL mode, busy
timeout): a key revoked from the command line is noticed by the gateway's
periodic re-check.

sqlite3 blocks, so queries run on worker threads; the event loop only awaits
them.  Reads (key lookups, reports, ``ping``) have a connection and a thread of
their own: a write waiting for another process's lock (up to the busy
timeout, again on each retry) never holds up the lookups that admit sessions,
and WAL lets them read meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from transcribe_gateway.exceptions import ConfigError
from transcribe_gateway.store.keys import (
    DEFAULT_SCOPES,
    NO_LIMITS,
    TOKEN_CLOCK_SKEW_S,
    KeyExistsError,
    KeyLimits,
    KeyRecord,
    check_new_key,
    hash_key,
    new_key,
)
from transcribe_gateway.store.usage import Period, UsageRecord, UsageRow

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    scopes TEXT NOT NULL,
    max_sessions INTEGER NOT NULL DEFAULT 0,
    audio_minutes REAL NOT NULL DEFAULT 0,
    period TEXT NOT NULL DEFAULT 'month',
    messages_per_second REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL,
    key_name TEXT NOT NULL,
    session_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    audio_seconds REAL NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    close_reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_started ON usage (key_id, started_at);
CREATE INDEX IF NOT EXISTS usage_session ON usage (session_id);
CREATE TABLE IF NOT EXISTS used_tokens (
    id TEXT PRIMARY KEY,
    keep_until REAL NOT NULL
);
"""
_SESSIONS_MAX = 100_000
"""Sessions whose metered audio is remembered (the most recently metered)."""
_BUSY_TIMEOUT_S = 5.0
"""How long one statement waits for another process's lock (then "database is locked")."""
_HEADER = b"SQLite format 3\x00"

_KEY_COLUMNS = (
    "id, name, key_hash, created_at, expires_at, revoked_at, scopes, "
    "max_sessions, audio_minutes, period, messages_per_second"
)
_FORMATS = {"day": "%Y-%m-%d", "month": "%Y-%m"}


def _record(row: tuple[Any, ...]) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        name=row[1],
        key_hash=row[2],
        created_at=row[3],
        expires_at=row[4],
        revoked_at=row[5],
        scopes=tuple(json.loads(row[6])),
        limits=KeyLimits(
            max_sessions=row[7], audio_minutes=row[8], period=row[9], messages_per_second=row[10]
        ),
    )


def open_database(path: Path) -> sqlite3.Connection:
    """Open the store file, creating it (and its directory) on first use.

    Raises:
        ConfigError: it cannot be opened or created, naming ``store.path``.
    """
    check_path(path)  # the clearer message, where it can tell
    try:
        if path.parent != Path():
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.commit()
        except BaseException:
            db.close()
            raise
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"store.path: cannot open {path}: {reason} (TRANSCRIBE_STORE_PATH)"
        ) from None
    return db


def check_path(path: str | Path) -> None:
    """What :func:`open_database` would refuse, found without creating or writing anything.

    Raises:
        ConfigError: naming ``store.path``.
    """
    path = Path(path)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"store.path: {path} {why} (TRANSCRIBE_STORE_PATH)")

    try:
        _check_path(path, refuse)
    except OSError as exc:  # a directory we may not search, a name too long
        raise refuse(f"cannot be checked: {exc.strerror or exc}") from None


def _check_path(path: Path, refuse: Callable[[str], ConfigError]) -> None:
    """:func:`check_path`'s checks (an ``OSError`` is left to it)."""
    if path.is_dir():
        raise refuse("is a directory")
    if path.exists():
        try:
            with path.open("rb") as f:
                header = f.read(len(_HEADER))
        except OSError as exc:
            raise refuse(f"cannot be read: {exc.strerror}") from None
        if header and header != _HEADER:
            raise refuse("is not a SQLite database")
        if not os.access(path, os.W_OK):
            raise refuse("is not writable")
    # The nearest directory that exists must take the file (and its -wal, -shm).
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"cannot be created: {parent} is not writable")


def _execute(
    db: sqlite3.Connection | None, sql: str, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    """One statement, committed (on the worker thread that owns ``db``)."""
    if db is None:
        raise RuntimeError("store not started")
    rows = db.execute(sql, params).fetchall()
    db.commit()
    return rows


def _claim(db: sqlite3.Connection | None, token_id: str, keep_until: float, now: float) -> bool:
    """Record a used token unless it is recorded already (on the writer thread)."""
    if db is None:
        raise RuntimeError("store not started")
    db.execute("DELETE FROM used_tokens WHERE keep_until <= ?", (now,))
    added = db.execute(
        "INSERT OR IGNORE INTO used_tokens (id, keep_until) VALUES (?, ?)", (token_id, keep_until)
    ).rowcount
    db.commit()
    return added == 1


class SqliteStore:
    """Keys, usage and used tokens in a SQLite file; session slots, rates and metered
    audio in memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None
        self._read_pool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store-read")
        self._read_db: sqlite3.Connection | None = None
        self._slots: dict[str, set[str]] = {}
        self._audio: dict[tuple[str, str], float] = {}
        self._session_audio: OrderedDict[str, float] = OrderedDict()
        """Each session's metered audio seconds (the latest :data:`_SESSIONS_MAX`)."""
        self._messages: dict[str, tuple[int, int]] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _write(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await self._run(_execute, self._db, sql, params)

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await asyncio.get_running_loop().run_in_executor(
            self._read_pool, _execute, self._read_db, sql, params
        )

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self._db = open_database(self.path)
        try:
            # Opened after the writer: the file exists, with its schema, in WAL mode.
            reader = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
            reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            self._db.close()
            self._db = None
            raise ConfigError(
                f"store.path: cannot open {self.path}: {exc} (TRANSCRIBE_STORE_PATH)"
            ) from None
        self._read_db = reader

    async def aclose(self) -> None:
        if self._read_db is not None:
            await asyncio.get_running_loop().run_in_executor(self._read_pool, self._read_db.close)
            self._read_db = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._read_pool.shutdown(wait=False)
        self._pool.shutdown(wait=False)

    async def ping(self) -> bool:
        try:
            await self._read("SELECT 1", ())
        except (sqlite3.Error, RuntimeError):
            return False
        return True

    # ------------------------------------------------------------------ keys

    async def create_key(
        self,
        name: str,
        *,
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
        limits: KeyLimits = NO_LIMITS,
        expires_at: float | None = None,
    ) -> tuple[KeyRecord, str]:
        check_new_key(name, limits, expires_at)
        record, secret = new_key(name, scopes=scopes, limits=limits, expires_at=expires_at)
        try:
            await self._write(
                f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    name,
                    record.key_hash,
                    record.created_at,
                    expires_at,
                    None,
                    json.dumps(list(scopes)),
                    limits.max_sessions,
                    limits.audio_minutes,
                    limits.period,
                    limits.messages_per_second,
                ),
            )
        except sqlite3.IntegrityError as exc:
            if "keys.name" not in str(exc):  # not the name's UNIQUE constraint
                raise
            raise KeyExistsError(f"a key named {name!r} exists already") from None
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created_at", ())
        return [_record(r) for r in rows]

    async def revoke_key(self, name: str) -> bool:
        # One key: the one of that name, else the one of that id (as with Redis).
        rows = await self._write(
            "UPDATE keys SET revoked_at = ? WHERE revoked_at IS NULL "
            "AND id = COALESCE((SELECT id FROM keys WHERE name = ?), ?) RETURNING id",
            (time.time(), name, name),
        )
        return bool(rows)

    async def find_key(self, secret: str) -> KeyRecord | None:
        rows = await self._read(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_hash = ?",
            (hash_key(secret),),
        )
        return _record(rows[0]) if rows else None

    async def get_keys(self, key_ids: list[str]) -> dict[str, KeyRecord]:
        if not key_ids:
            return {}
        marks = ",".join("?" * len(key_ids))
        rows = await self._read(
            f"SELECT {_KEY_COLUMNS} FROM keys WHERE id IN ({marks})", tuple(key_ids)
        )
        return {r[0]: _record(r) for r in rows}

    # ----------------------------------------------------------------- usage

    async def record_usage(self, record: UsageRecord) -> None:
        # Once per session: a write retried after a timeout may have landed already.
        await self._write(
            "INSERT INTO usage (key_id, key_name, session_id, provider, model, audio_seconds, "
            "started_at, ended_at, close_reason) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM usage WHERE session_id = ? AND key_id = ?)",
            (
                record.key_id,
                record.key_name,
                record.session_id,
                record.provider,
                record.model,
                record.audio_seconds,
                record.started_at,
                record.ended_at,
                record.close_reason,
                record.session_id,
                record.key_id,
            ),
        )

    async def usage_report(self, key_id: str | None, period: Period) -> list[UsageRow]:
        fmt = _FORMATS[period]
        where, params = ("WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        rows = await self._read(
            f"SELECT key_id, MAX(key_name), strftime('{fmt}', started_at, 'unixepoch') AS p, "
            f"COUNT(*), SUM(audio_seconds) FROM usage {where} "
            "GROUP BY key_id, p ORDER BY p DESC, MAX(key_name), key_id",
            params,
        )
        return [UsageRow(r[0], r[1], r[2], r[3], r[4] or 0.0) for r in rows]

    # ------------------------------------------------------------ live state

    async def acquire_slot(self, key_id: str, session_id: str, limit: int) -> bool:
        held = self._slots.setdefault(key_id, set())
        if limit and len(held) >= limit and session_id not in held:
            return False
        held.add(session_id)
        return True

    async def renew_slots(self, slots: list[tuple[str, str]]) -> None:
        return None  # in-process slots die with the process: nothing can leak

    async def release_slot(self, key_id: str, session_id: str) -> None:
        held = self._slots.get(key_id)
        if held is not None:
            held.discard(session_id)
            if not held:
                del self._slots[key_id]

    async def meter_audio(
        self, key_id: str, period_id: str, session_id: str, seconds: float
    ) -> float:
        slot = (key_id, period_id)
        if slot not in self._audio:
            # Loaded once per process and period; afterwards the live counter leads and
            # the records written at session end are already included in it.
            fmt = _FORMATS["day" if len(period_id) == 10 else "month"]
            rows = await self._read(
                "SELECT COALESCE(SUM(audio_seconds), 0) FROM usage WHERE key_id = ? AND "
                f"strftime('{fmt}', started_at, 'unixepoch') = ?",
                (key_id, period_id),
            )
            self._audio.setdefault(slot, float(rows[0][0]))
        # No await from here on: a call is done whole or not at all.
        session = f"{key_id}|{period_id}|{session_id}"
        before = self._session_audio.get(session, 0.0)
        if seconds > before:
            self._audio[slot] += seconds - before
            self._session_audio[session] = seconds
        if session in self._session_audio:
            self._session_audio.move_to_end(session)  # a live session meters every tick
            if len(self._session_audio) > _SESSIONS_MAX:
                self._session_audio.popitem(last=False)
        return self._audio[slot]

    async def add_messages(self, key_id: str, window: int, count: int) -> int:
        start, total = self._messages.get(key_id, (window, 0))
        total = total + count if start == window else count
        self._messages[key_id] = (window, total)
        return total

    # ---------------------------------------------------------------- tokens

    async def claim(self, token_id: str, expires_at: float) -> bool:
        # In the file, not in memory: a token used before a restart stays used after it.
        keep_until = expires_at + TOKEN_CLOCK_SKEW_S
        return await self._run(_claim, self._db, token_id, keep_until, time.time())
