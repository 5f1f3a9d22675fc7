"""``transcribe-gateway keys create|list|revoke`` and ``transcribe-gateway usage``.

They use the store the gateway is configured with (same config file and
environment), so they work against a running gateway's SQLite file or Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.exceptions import RedisError

from transcribe_gateway.config import Settings, load_settings
from transcribe_gateway.server.auth import fingerprint
from transcribe_gateway.store import open_store
from transcribe_gateway.store.keys import (
    DEFAULT_SCOPES,
    MAX_EXPIRY_DAYS,
    MAX_SESSIONS_LIMIT,
    KeyExistsError,
    KeyLimits,
    Store,
)
from transcribe_gateway.store.usage import format_report


def _count(raw: str) -> int:
    """``--max-sessions``: a whole number, 0 (the server's limit) to MAX_SESSIONS_LIMIT."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
    if not 0 <= value <= MAX_SESSIONS_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_SESSIONS_LIMIT}, not {value}")
    return value


def _amount(raw: str) -> float:
    """``--audio-minutes``: a finite number >= 0 (0: no limit)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {raw!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: no limit), not {raw}")
    return value


def _rate(raw: str) -> float:
    """``--rate``: whole messages per second >= 0 (0: no limit).

    Messages are counted per one-second window, so a fraction would not hold:
    0.5 would let one message a second through.
    """
    value = _amount(raw)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"must be a whole number of messages per second (0: no limit), not {raw}"
        )
    return value


def _days(raw: str) -> float:
    """``--expires-in``: days, over 0 and at most MAX_EXPIRY_DAYS."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, not {raw!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_EXPIRY_DAYS):
        raise argparse.ArgumentTypeError(
            f"must be a number of days over 0 and at most {MAX_EXPIRY_DAYS}, not {raw}"
        )
    return value


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="manage API keys in the store")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("name", help="a unique name for the key (e.g. a customer)")
    create.add_argument(
        "--max-sessions", type=_count, default=0, help="concurrent sessions (0: the server's)"
    )
    create.add_argument(
        "--audio-minutes", type=_amount, default=0.0, help="per --period (0: no quota)"
    )
    create.add_argument("--period", choices=["day", "month"], default="month")
    create.add_argument(
        "--rate", type=_rate, default=0.0, help="whole messages per second (0: no limit)"
    )
    create.add_argument("--expires-in", type=_days, help="days until the key expires")
    create.add_argument(
        "--scope",
        action="append",
        choices=list(DEFAULT_SCOPES),
        help="repeatable; default: all (transcribe, usage)",
    )
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by name or id")
    revoke.add_argument("name")
    for parser in keys_sub.choices.values():
        parser.add_argument("--config", help="TOML config file (env TRANSCRIBE_CONFIG)")
    usage = sub.add_parser("usage", help="usage per key and period")
    usage.add_argument(
        "--key", help="only this key: its name or id, or static:<fingerprint> for a static key"
    )
    usage.add_argument("--period", choices=["day", "month"], default="month")
    usage.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    usage.add_argument("--config", help="TOML config file (env TRANSCRIBE_CONFIG)")


def _run(
    args: argparse.Namespace,
    job: Callable[[Store], Awaitable[int]],
    settings: Settings | None = None,
    *,
    create: bool = False,
) -> int:
    """Run ``job`` on the configured store; its exit status, or 1 when the store fails.

    Only ``create`` (``keys create``) may create a SQLite file: a command that
    reads or changes keys at a mistyped path would otherwise leave an empty store there.
    """
    settings = settings or load_settings(args.config)
    cfg = settings.store
    if cfg.backend == "sqlite" and not create and not Path(cfg.path).exists():
        print(
            f"transcribe-gateway: store.path: {cfg.path} does not exist (no key was created "
            "there; check store.path / TRANSCRIBE_STORE_PATH)",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        store = open_store(cfg)
        await store.start()
        try:
            return await job(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(main())
    except (RedisError, sqlite3.Error, OSError) as exc:
        # Redis away, a SQLite lock held past the busy timeout: one line, no traceback.
        where = f" ({cfg.path})" if cfg.backend == "sqlite" else ""
        print(f"transcribe-gateway: store unavailable: {exc}{where}", file=sys.stderr)
        return 1


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    except (OverflowError, ValueError, OSError, TypeError):  # a bad stored value: show it
        return f"invalid:{stamp}"


def _number(value: object, spec: str) -> str:
    try:
        return format(value, spec)
    except (TypeError, ValueError):  # a bad stored value: shown, never a crash
        return format(str(value), spec.rstrip("gd"))


def run_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "create":
        limits = KeyLimits(args.max_sessions, args.audio_minutes, args.period, args.rate)
        expires = time.time() + args.expires_in * 86400 if args.expires_in is not None else None
        scopes = tuple(dict.fromkeys(args.scope)) if args.scope else DEFAULT_SCOPES

        async def create(store: Store) -> int:
            try:
                record, secret = await store.create_key(
                    args.name, scopes=scopes, limits=limits, expires_at=expires
                )
            except KeyExistsError as exc:
                print(f"transcribe-gateway: {exc}", file=sys.stderr)
                return 1
            except ValueError as exc:  # a limit the store refuses
                print(f"transcribe-gateway: keys create: {exc}", file=sys.stderr)
                return 2
            print(secret)
            print(
                f"created key {record.name} ({record.id}); the key above is shown only once",
                file=sys.stderr,
            )
            return 0

        return _run(args, create, create=True)
    if args.keys_command == "revoke":

        async def revoke(store: Store) -> int:
            if await store.revoke_key(args.name):
                print(f"revoked {args.name}")
                return 0
            print(f"transcribe-gateway: no active key {args.name!r}", file=sys.stderr)
            return 1

        return _run(args, revoke)

    async def listing(store: Store) -> int:
        print(
            f"{'name':<20} {'id':<16} {'status':<8} {'created':<20} {'expires':<20} "
            "sessions audio_min period rate scopes"
        )
        for r in await store.list_keys():
            lim = r.limits
            try:
                status: str = r.status()
            except TypeError:  # a bad stored expiry
                status = "invalid"
            print(
                f"{r.name[:20]:<20} {r.id:<16} {status:<8} {_when(r.created_at):<20} "
                f"{_when(r.expires_at):<20} {_number(lim.max_sessions, '>8')} "
                f"{_number(lim.audio_minutes, '>9g')} {lim.period:<6} "
                f"{_number(lim.messages_per_second, '>4g')} {','.join(r.scopes)}"
            )
        return 0

    return _run(args, listing)


def _static_id(name: str) -> str | None:
    """``static:<fingerprint>`` (as reports name a static key) or ``static-<fingerprint>``
    (as logs and records' ids do) -> the records' key id."""
    for prefix in ("static:", "static-"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return "static-" + name.removeprefix(prefix)
    return None


async def _usage_key_id(store: Store, settings: Settings, name: str) -> str | None:
    """The key id whose records ``--key name`` asks for; ``None`` when no key has that name."""
    stored = await store.list_keys()
    # A name first, then an id, as `keys revoke` resolves it.
    found = next((k for k in stored if k.name == name), None) or next(
        (k for k in stored if k.id == name), None
    )
    if found is not None:
        return found.id
    key_id = _static_id(name)
    configured = settings.keys()
    if key_id is not None and key_id.removeprefix("static-") in map(fingerprint, configured):
        return key_id  # a static key of this configuration, used or not
    # A key known only by its records (a static key since removed from api_keys).
    for row in await store.usage_report(None, "month"):
        if name in (row.key_name, row.key_id) or key_id == row.key_id:
            return row.key_id
    return None


def run_usage(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)

    async def report(store: Store) -> int:
        key_id = None
        if args.key:
            key_id = await _usage_key_id(store, settings, args.key)
            if key_id is None:
                print(
                    f"transcribe-gateway: usage: no key {args.key!r} (a stored key's name or id, "
                    "or static:<fingerprint> as the usage report names a static key)",
                    file=sys.stderr,
                )
                return 1
        rows = await store.usage_report(key_id, args.period)
        if args.json:
            for row in rows:
                print(json.dumps(row.to_dict()))
        else:
            print(format_report(rows))
        return 0

    return _run(args, report, settings)
