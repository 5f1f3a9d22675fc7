"""``transcribe-gateway keys create|list|revoke`` and ``transcribe-gateway usage``.

They use the store the gateway is configured with (same config file and
environment), so they work against a running gateway's SQLite file or Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from transcribe_gateway.config import load_settings
from transcribe_gateway.store import open_store
from transcribe_gateway.store.keys import DEFAULT_SCOPES, KeyExistsError, KeyLimits, Store
from transcribe_gateway.store.usage import format_report

T = TypeVar("T")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="manage API keys in the store")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("name", help="a unique name for the key (e.g. a customer)")
    create.add_argument("--max-sessions", type=int, default=0, help="concurrent sessions")
    create.add_argument("--audio-minutes", type=float, default=0.0, help="per --period")
    create.add_argument("--period", choices=["day", "month"], default="month")
    create.add_argument("--rate", type=float, default=0.0, help="messages per second")
    create.add_argument("--expires-in", type=float, help="days until the key expires")
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
    usage.add_argument("--key", help="only this key (name or id)")
    usage.add_argument("--period", choices=["day", "month"], default="month")
    usage.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    usage.add_argument("--config", help="TOML config file (env TRANSCRIBE_CONFIG)")


def _run(args: argparse.Namespace, job: Callable[[Store], Awaitable[T]]) -> T:
    settings = load_settings(args.config)

    async def main() -> T:
        store = open_store(settings.store)
        await store.start()
        try:
            return await job(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


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
            print(secret)
            print(
                f"created key {record.name} ({record.id}); the key above is shown only once",
                file=sys.stderr,
            )
            return 0

        return _run(args, create)
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
            print(
                f"{r.name[:20]:<20} {r.id:<16} {r.status():<8} {_when(r.created_at):<20} "
                f"{_when(r.expires_at):<20} {lim.max_sessions:>8} {lim.audio_minutes:>9g} "
                f"{lim.period:<6} {lim.messages_per_second:>4g} {','.join(r.scopes)}"
            )
        return 0

    return _run(args, listing)


def run_usage(args: argparse.Namespace) -> int:
    async def report(store: Store) -> int:
        key_id = None
        if args.key:
            found = [k for k in await store.list_keys() if args.key in (k.name, k.id)]
            # Static keys are recorded under "static-<fingerprint>" (not in the key list).
            key_id = found[0].id if found else args.key
        rows = await store.usage_report(key_id, args.period)
        if args.json:
            for row in rows:
                print(json.dumps(row.to_dict()))
        else:
            print(format_report(rows))
        return 0

    return _run(args, report)
