"""The store contract, run against both backends (a SQLite file and a real Redis)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.ops.conftest import RedisServer
from transcribe_gateway.config import Settings
from transcribe_gateway.store import redis as redis_store
from transcribe_gateway.store import sqlite as sqlite_store
from transcribe_gateway.store.cli import _usage_key_id
from transcribe_gateway.store.keys import (
    TOKEN_CLOCK_SKEW_S,
    KeyExistsError,
    KeyLimits,
    Store,
    hash_key,
)
from transcribe_gateway.store.redis import RedisStore
from transcribe_gateway.store.sqlite import SqliteStore
from transcribe_gateway.store.usage import UsageRecord, period_id


@pytest.fixture(params=["sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "sqlite":
        backend = SqliteStore(tmp_path / "store.db")
    else:
        backend = RedisStore(redis_server.url, lease_ttl_s=1.0)
        await backend.start()
        await backend.client.flushdb()
    await backend.start()
    yield backend
    await backend.aclose()


def record(key_id: str, seconds: float, at: float, session: str = "ts_1") -> UsageRecord:
    return UsageRecord(key_id, "named", session, "LOCAL", "whisper-tiny.en", seconds, at, at, "x")


class TestStoreContract:
    async def test_store_creates_finds_and_revokes_keys(self, store: Store) -> None:
        limits = KeyLimits(max_sessions=3, audio_minutes=1.5, period="day", messages_per_second=9)
        created, secret = await store.create_key("acme", limits=limits, expires_at=None)
        assert created.key_hash == hash_key(secret) and secret not in repr(created)
        found = await store.find_key(secret)
        assert found == created
        assert await store.find_key(secret + "x") is None
        with pytest.raises(KeyExistsError):
            await store.create_key("acme")
        assert [k.name for k in await store.list_keys()] == ["acme"]
        assert await store.revoke_key("acme")
        assert not await store.revoke_key("acme")
        again = (await store.get_keys([created.id]))[created.id]
        assert again.status() == "revoked"
        assert await store.get_keys(["key_missing"]) == {}

    async def test_store_reports_expiry(self, store: Store) -> None:
        created, _ = await store.create_key("brief", expires_at=time.time() - 1)
        assert created.status() == "expired"

    async def test_store_slots_respect_the_limit(self, store: Store) -> None:
        assert await store.acquire_slot("k", "s1", 2)
        assert await store.acquire_slot("k", "s2", 2)
        assert not await store.acquire_slot("k", "s3", 2)
        assert await store.acquire_slot("other", "s3", 2)
        await store.release_slot("k", "s1")
        assert await store.acquire_slot("k", "s3", 2)
        assert await store.acquire_slot("k", "s9", 0)  # 0: no limit

    async def test_store_meters_audio_and_messages(self, store: Store) -> None:
        pid = period_id("day")
        assert await store.meter_audio("k", pid, "s1", 0.0) == 0.0
        assert await store.meter_audio("k", pid, "s1", 1.5) == pytest.approx(1.5)
        assert await store.meter_audio("k", pid, "s2", 2.0) == pytest.approx(3.5)
        # A session's running total: only what is new is added, so a call retried
        # after its answer was lost, or an older one arriving late, adds nothing.
        assert await store.meter_audio("k", pid, "s1", 2.5) == pytest.approx(4.5)
        assert await store.meter_audio("k", pid, "s1", 2.5) == pytest.approx(4.5)
        assert await store.meter_audio("k", pid, "s1", 1.5) == pytest.approx(4.5)
        assert await store.meter_audio("k", "1999-01-01", "s3", 1.0) == pytest.approx(1.0)
        assert await store.add_messages("k", 100, 3) == 3
        assert await store.add_messages("k", 100, 2) == 5
        assert await store.add_messages("k", 101, 1) == 1

    async def test_store_reports_usage_per_key_and_period(self, store: Store) -> None:
        now = time.time()
        await store.record_usage(record("a", 1.0, now, "ts_1"))
        await store.record_usage(record("a", 2.5, now, "ts_2"))
        await store.record_usage(record("b", 4.0, now, "ts_3"))
        await store.record_usage(record("a", 7.0, now - 400 * 86400, "ts_4"))
        rows = await store.usage_report("a", "month")
        assert [(r.period, r.sessions, r.audio_seconds) for r in rows] == [
            (period_id("month", now), 2, 3.5),
            (period_id("month", now - 400 * 86400), 1, 7.0),
        ]
        everyone = await store.usage_report(None, "day")
        today = [(r.key_id, r.sessions) for r in everyone if r.period == period_id("day", now)]
        assert today == [("a", 2), ("b", 1)]

    async def test_store_writes_a_sessions_record_once_however_often_it_is_retried(
        self, store: Store
    ) -> None:
        # A write retried after a timeout may have landed already: billing counts it once.
        now = time.time()
        for _ in range(3):
            await store.record_usage(record("a", 2.0, now, "ts_retried"))
        await store.record_usage(record("a", 1.0, now, "ts_other"))
        rows = await store.usage_report("a", "day")
        assert [(r.sessions, r.audio_seconds) for r in rows] == [(2, 3.0)]
        assert [(r.sessions, r.audio_seconds) for r in await store.usage_report("a", "month")] == [
            (2, 3.0)
        ]

    @pytest.mark.parametrize(
        "limits",
        [
            KeyLimits(max_sessions=-1),
            KeyLimits(audio_minutes=-5),
            KeyLimits(audio_minutes=float("nan")),
            KeyLimits(messages_per_second=float("inf")),
        ],
    )
    async def test_store_refuses_a_key_with_a_bad_limit(
        self, store: Store, limits: KeyLimits
    ) -> None:
        with pytest.raises(ValueError) as info:
            await store.create_key("bad", limits=limits)
        assert not isinstance(info.value, KeyExistsError)
        with pytest.raises(ValueError):
            await store.create_key("bad", expires_at=float("inf"))
        assert await store.list_keys() == []

    async def test_store_ping(self, store: Store) -> None:
        assert await store.ping()

    @pytest.mark.parametrize("name", ["key_0123456789ab", "key_5a51a102a0fa"])
    async def test_store_refuses_a_name_that_looks_like_a_key_id(
        self, store: Store, name: str
    ) -> None:
        # `keys revoke X` and `usage --key X` take a name or an id: X must be one key.
        with pytest.raises(ValueError, match="looks like a key id"):
            await store.create_key(name)
        assert await store.list_keys() == []
        await store.create_key("key_of_acme")  # not an id's form: a name like any other
        await store.create_key("KEY_0123456789AB")

    async def test_store_refuses_a_fractional_message_rate(self, store: Store) -> None:
        # Messages are counted per second: 0.5 a second would let one through each second.
        with pytest.raises(ValueError, match="whole number"):
            await store.create_key("half", limits=KeyLimits(messages_per_second=0.5))
        assert await store.list_keys() == []
        await store.create_key("two", limits=KeyLimits(messages_per_second=2.0))

    async def test_store_resolves_a_name_before_an_id(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A key named like another's id, created before such names were refused.
        first, _ = await store.create_key("first")
        for module in (sqlite_store, redis_store):
            monkeypatch.setattr(module, "check_new_key", lambda *args: None)
        legacy, _ = await store.create_key(first.id)
        settings = Settings()
        assert await _usage_key_id(store, settings, first.id) == legacy.id
        assert await _usage_key_id(store, settings, "first") == first.id
        assert await store.revoke_key(first.id)  # the key of that name, only
        keys = {k.name: k.status() for k in await store.list_keys()}
        assert keys == {"first": "active", first.id: "revoked"}
        assert not await store.revoke_key(first.id)  # that name's key is revoked already
        assert (await store.get_keys([first.id]))[first.id].status() == "active"
        assert await store.revoke_key("first")


class TestSqliteOnly:
    async def test_sqlite_token_ledger_outlives_a_restart(self, tmp_path: Path) -> None:
        # A token used before a restart must stay used after it (with a configured
        # token_secret it still verifies), and records go once past expiry + skew.
        store = SqliteStore(tmp_path / "store.db")
        await store.start()
        try:
            assert await store.claim("tok_1", time.time() + 60)
            assert not await store.claim("tok_1", time.time() + 60)
            assert await store.claim("tok_old", time.time() - TOKEN_CLOCK_SKEW_S - 1)
        finally:
            await store.aclose()
        again = SqliteStore(tmp_path / "store.db")
        await again.start()
        try:
            assert not await again.claim("tok_1", time.time() + 60)
            assert await again.claim("tok_2", time.time() + 60)
            with sqlite3.connect(tmp_path / "store.db") as db:
                ids = {row[0] for row in db.execute("SELECT id FROM used_tokens")}
            assert ids == {"tok_1", "tok_2"}  # tok_old was dropped by the next claim
        finally:
            await again.aclose()

    async def test_sqlite_lookups_do_not_wait_for_a_write_held_by_a_lock(
        self, tmp_path: Path
    ) -> None:
        # Another process (a `keys` command, a backup) holds the write lock while a
        # session's usage record is written: the write waits (the busy timeout, again
        # on each retry), and key lookups must not queue behind it (WAL reads go on).
        store = SqliteStore(tmp_path / "store.db")
        await store.start()
        lock = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        try:
            created, secret = await store.create_key("acme")
            lock.execute("BEGIN IMMEDIATE")
            write = asyncio.create_task(store.record_usage(record(created.id, 2.0, time.time())))
            await asyncio.sleep(0.2)  # the write is waiting for the lock
            lookup = asyncio.create_task(store.find_key(secret))
            done, _ = await asyncio.wait({write, lookup}, return_when=asyncio.FIRST_COMPLETED)
            # The write cannot end before the lock is released (or its busy timeout
            # passes): the lookup answered first, while the write still waited.
            assert lookup in done and write not in done
            assert lookup.result() == created
            assert await store.get_keys([created.id]) == {created.id: created}
            assert await store.ping()
            lock.execute("ROLLBACK")
            await write  # and the record is written once the lock is gone
            rows = await store.usage_report(created.id, "day")
            assert [(r.sessions, r.audio_seconds) for r in rows] == [(1, 2.0)]
        finally:
            lock.close()
            await store.aclose()


class TestRedisOnly:
    async def test_redis_one_keys_report_reads_only_that_keys_totals(
        self, redis_server: RedisServer
    ) -> None:
        # GET /v1/usage reports one key: what Redis sends back for it must not grow
        # with the other keys' totals, which share its periods' hashes.
        store = RedisStore(redis_server.url)
        await store.start()
        await store.client.flushdb()
        now = time.time()
        days = [now - d * 86400 for d in range(3)]

        async def report_bytes() -> int:
            await store.client.config_resetstat()
            rows = await store.usage_report("mine", "day")
            info = await store.client.info("stats")
            assert [(r.key_name, r.sessions, r.audio_seconds) for r in rows] == [
                ("named", 1, 1.5)
            ] * 3
            return int(info["total_net_output_bytes"])

        try:
            for i, at in enumerate(days):
                await store.record_usage(record("mine", 1.5, at, f"ts_mine{i}"))
            alone = await report_bytes()
            for k in range(100):
                for i, at in enumerate(days):
                    await store.record_usage(record(f"key_other{k:03}", 9.0, at, f"ts_{k}_{i}"))
            crowded = await report_bytes()
            # The same bytes (give or take a reconnection's handshake): reading the
            # periods' whole hashes, as before, sent some 30 kB more here.
            assert crowded < alone + 100
            # The full report (the `usage` command) still has every key.
            everyone = await store.usage_report(None, "day")
            assert len(everyone) == 3 * 101
            assert {r.key_id for r in everyone if r.period == period_id("day", now)} == {
                "mine",
                *(f"key_other{k:03}" for k in range(100)),
            }
        finally:
            await store.aclose()

    async def test_redis_lease_expires_without_renewal(self, redis_server: RedisServer) -> None:
        store = RedisStore(redis_server.url, lease_ttl_s=1.0)
        await store.start()
        try:
            assert await store.acquire_slot("lease", "s1", 1)
            await asyncio.sleep(0.6)
            await store.renew_slots([("lease", "s1")])
            await asyncio.sleep(0.6)  # 1.2 s after acquiring: renewed, still held
            assert not await store.acquire_slot("lease", "s2", 1)
            await asyncio.sleep(1.2)  # not renewed any more: expired
            assert await store.acquire_slot("lease", "s2", 1)
        finally:
            await store.aclose()

    async def test_redis_renewal_counts_a_lapsed_session_again(
        self, redis_server: RedisServer
    ) -> None:
        store = RedisStore(redis_server.url, lease_ttl_s=30.0)
        await store.start()
        try:
            assert await store.acquire_slot("lapsed", "s1", 1)
            # s1's lease lapsed while it streamed on (Redis away for longer than the
            # lease, or restarted without its data): its slot is gone.
            await store.client.delete("tg:slots:lapsed")
            await store.renew_slots([("lapsed", "s1")])  # Redis is back: s1 renews
            assert not await store.acquire_slot("lapsed", "s2", 1)
            await store.release_slot("lapsed", "s1")
            assert await store.acquire_slot("lapsed", "s2", 1)
        finally:
            await store.aclose()

    async def test_redis_token_ledger_claims_once(self, redis_server: RedisServer) -> None:
        store = RedisStore(redis_server.url)
        other = RedisStore(redis_server.url)  # another replica
        await store.start()
        await other.start()
        try:
            expires = time.time() + 60
            assert await store.claim("tok_1", expires)
            assert not await other.claim("tok_1", expires)
            assert await other.claim("tok_2", expires)
            # A replica whose clock runs behind still takes a token as unexpired for
            # a while after its expiry here: the record outlives it by the allowed skew.
            assert await store.claim("tok_3", time.time() + 0.5)
            pttl = await store.client.pttl("tg:token:tok_3")
            assert pttl > (TOKEN_CLOCK_SKEW_S - 5) * 1000
        finally:
            await store.aclose()
            await other.aclose()
