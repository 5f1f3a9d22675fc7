"""The store contract, run against both backends (a SQLite file and a real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.ops.conftest import RedisServer
from transcribe_gateway.store.keys import KeyExistsError, KeyLimits, Store, hash_key
from transcribe_gateway.store.redis import TOKEN_CLOCK_SKEW_S, RedisStore
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


class TestRedisOnly:
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
