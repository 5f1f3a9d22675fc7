"""Admission in process against a real Redis: store failures in the ops tick and rate sync."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.ops.conftest import Live, RedisServer
from transcribe_gateway.config import Settings, StoreSettings
from transcribe_gateway.server.limits import Admission, Grant, Refusal, SessionLimits
from transcribe_gateway.store.keys import KeyLimits
from transcribe_gateway.store.redis import RedisStore
from transcribe_gateway.store.sqlite import SqliteStore


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    backend = RedisStore(redis_server.url)
    await backend.start()
    await backend.client.flushdb()
    yield backend
    await backend.aclose()


def admission(redis_server: RedisServer, store: RedisStore) -> Admission:
    settings = Settings(store=StoreSettings(backend="redis", redis_url=redis_server.url))
    return Admission(settings, store)


async def metered(store: RedisStore, grant: Grant) -> float:
    """The key's audio seconds in Redis (through the real store, not a patched one)."""
    return await RedisStore.meter_audio(store, grant.key_id, grant.period_id, "reader", 0.0)


async def quota_session(gate: Admission, key_id: str, session_id: str) -> Live:
    grant = Grant(key_id, key_id, KeyLimits(audio_minutes=10), stored=False)
    assert await gate.admit(grant, session_id) is grant
    return Live(grant, session_id)


class TestRateSync:
    async def test_rate_sharing_resumes_after_a_failed_round(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gate = admission(redis_server, store)
        failed = asyncio.Event()
        real_add = store.add_messages

        async def add_messages(key_id: str, window: int, count: int) -> int:
            if not failed.is_set():  # Redis away for one round
                failed.set()
                raise RedisConnectionError("Connection closed by server.")
            return await real_add(key_id, window, count)

        monkeypatch.setattr(store, "add_messages", add_messages)
        other = RedisStore(redis_server.url)  # another replica
        await other.start()
        grant = Grant("key_rate", "rate", KeyLimits(messages_per_second=50), stored=True)
        limits = SessionLimits(grant)
        runner = asyncio.create_task(gate.run([]))
        try:
            assert gate.check_message(limits)
            async with asyncio.timeout(10):
                await failed.wait()
            # The other replica sends 100 messages a second for the key, this one ~20:
            # once the sync runs again, this replica holds its messages back.
            within = True
            deadline = time.monotonic() + 10
            while within and time.monotonic() < deadline:
                await other.add_messages("key_rate", int(time.time()), 100)
                await asyncio.sleep(0.05)
                within = gate.check_message(limits)
            assert not within
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await other.aclose()


class TestMetering:
    async def test_a_tick_during_end_does_not_meter_the_audio_twice(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gate = admission(redis_server, store)
        live = await quota_session(gate, "key_race", "ts_1")
        live.grant.used = 2.0
        entered, answer = asyncio.Event(), asyncio.Event()
        real_add = store.meter_audio

        async def meter_audio(key_id: str, period: str, session_id: str, seconds: float) -> float:
            if seconds and not entered.is_set():  # end()'s add, held until the tick ran
                entered.set()
                await answer.wait()
            return await real_add(key_id, period, session_id, seconds)

        monkeypatch.setattr(store, "meter_audio", meter_audio)
        ending = asyncio.create_task(gate.end(live.grant, "ts_1", "LOCAL", "m", "x", 2.0))
        async with asyncio.timeout(10):
            await entered.wait()
        await gate.tick([live])  # type: ignore[list-item]
        answer.set()
        await ending
        await gate.flush_usage()  # the record and the last audio are written in the background
        assert await metered(store, live.grant) == pytest.approx(2.0)

    @pytest.mark.parametrize("failure", ["error", "timeout"])
    async def test_audio_a_tick_failed_to_meter_is_metered_later(
        self,
        redis_server: RedisServer,
        store: RedisStore,
        monkeypatch: pytest.MonkeyPatch,
        failure: str,
    ) -> None:
        gate = admission(redis_server, store)
        live = await quota_session(gate, f"key_{failure}", "ts_2")
        live.grant.used = 5.0
        failed = asyncio.Event()
        real_add = store.meter_audio

        async def meter_audio(key_id: str, period: str, session_id: str, seconds: float) -> float:
            if seconds and not failed.is_set():  # the tick's add
                failed.set()
                if failure == "error":
                    raise RedisConnectionError("Connection closed by server.")
                await asyncio.Event().wait()  # never answers
            return await real_add(key_id, period, session_id, seconds)

        monkeypatch.setattr(store, "meter_audio", meter_audio)
        tick: asyncio.Task[Any] = asyncio.create_task(gate.tick([live]))  # type: ignore[list-item]
        async with asyncio.timeout(10):
            await failed.wait()
        if failure == "error":
            with pytest.raises(RedisConnectionError):
                await tick
        else:
            tick.cancel()  # what the ops loop's timeout does
            with pytest.raises(asyncio.CancelledError):
                await tick
        await gate.end(live.grant, "ts_2", "LOCAL", "m", "x", 5.0)
        await gate.flush_usage()
        assert await metered(store, live.grant) == pytest.approx(5.0)

    async def test_a_record_whose_answer_was_lost_is_retried_and_counted_once(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The write ran in Redis but its answer was lost (the connection dropped): the
        # retry must neither bill the session twice nor meter its last audio twice.
        gate = admission(redis_server, store)
        live = await quota_session(gate, "key_lost", "ts_lost")
        live.grant.used = 3.0
        real_record = store.record_usage
        calls = 0

        async def record_usage(record: Any) -> None:
            nonlocal calls
            calls += 1
            await real_record(record)
            if calls == 1:
                raise RedisConnectionError("Connection closed by server.")

        monkeypatch.setattr(store, "record_usage", record_usage)
        await gate.end(live.grant, "ts_lost", "LOCAL", "m", "client_close", 3.0)
        async with asyncio.timeout(10):
            await gate.flush_usage()
        assert calls == 2
        rows = await store.usage_report("key_lost", "day")
        assert [(r.sessions, r.audio_seconds) for r in rows] == [(1, 3.0)]
        assert await metered(store, live.grant) == pytest.approx(3.0)

    async def test_a_last_addition_whose_answer_was_lost_is_metered_once(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The session's last audio was added in Redis but the answer was lost (a
        # socket timeout): the retry added it again, and the quota read 2x.
        gate = admission(redis_server, store)
        live = await quota_session(gate, "key_lost_add", "ts_lost_add")
        live.grant.used = 10.0
        real_add = store.meter_audio
        calls = 0

        async def meter_audio(key_id: str, period: str, session_id: str, seconds: float) -> float:
            nonlocal calls
            calls += 1
            total = await real_add(key_id, period, session_id, seconds)
            if calls == 1:
                raise TimeoutError("Timeout reading from redis")
            return total

        monkeypatch.setattr(store, "meter_audio", meter_audio)
        await gate.end(live.grant, "ts_lost_add", "LOCAL", "m", "client_close", 10.0)
        async with asyncio.timeout(10):
            await gate.flush_usage()
        assert calls == 2
        assert await metered(store, live.grant) == pytest.approx(10.0)

    async def test_a_tick_whose_answer_was_lost_is_metered_once(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The tick's addition ran in Redis but its answer was lost: the audio was
        # put back, added again by the session's end, and the quota read it twice.
        gate = admission(redis_server, store)
        live = await quota_session(gate, "key_tick_lost", "ts_tick_lost")
        live.grant.used = 4.0
        real_add = store.meter_audio
        lost = False

        async def meter_audio(key_id: str, period: str, session_id: str, seconds: float) -> float:
            nonlocal lost
            total = await real_add(key_id, period, session_id, seconds)
            if seconds and not lost:
                lost = True
                raise TimeoutError("Timeout reading from redis")
            return total

        monkeypatch.setattr(store, "meter_audio", meter_audio)
        with pytest.raises(TimeoutError):
            await gate.tick([live])  # type: ignore[list-item]
        assert lost
        live.grant.used = 6.0  # more audio came before the session ended
        await gate.end(live.grant, "ts_tick_lost", "LOCAL", "m", "client_close", 6.0)
        async with asyncio.timeout(10):
            await gate.flush_usage()
        assert await metered(store, live.grant) == pytest.approx(6.0)


class TestSlots:
    async def test_a_slot_whose_acquire_was_cancelled_is_given_back(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The acquire ran in Redis, but the client left (or the auth timed out)
        # before its answer came: the slot must not count against the key until
        # its lease expires.
        gate = admission(redis_server, store)
        ran, never = asyncio.Event(), asyncio.Event()
        real_acquire = store.acquire_slot

        async def acquire_slot(key_id: str, session_id: str, limit: int) -> bool:
            taken = await real_acquire(key_id, session_id, limit)
            ran.set()
            await never.wait()  # the answer is lost
            return taken

        monkeypatch.setattr(store, "acquire_slot", acquire_slot)
        grant = Grant("key_slot", "slot", KeyLimits(max_sessions=1), stored=True)
        admitting = asyncio.create_task(gate.admit(grant, "ts_gone"))
        async with asyncio.timeout(10):
            await ran.wait()
        assert await store.client.zcard("tg:slots:key_slot") == 1
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        monkeypatch.setattr(store, "acquire_slot", real_acquire)
        async with asyncio.timeout(10):
            await asyncio.gather(*getattr(gate, "_releases", ()))  # the give-back under way
        assert await store.client.zcard("tg:slots:key_slot") == 0
        other = Grant("key_slot", "slot", KeyLimits(max_sessions=1), stored=True)
        assert await gate.admit(other, "ts_next") is other

    async def test_a_renewal_racing_a_release_does_not_bring_the_slot_back(
        self, redis_server: RedisServer, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gate = admission(redis_server, store)
        grant = Grant("key_renew", "renew", KeyLimits(max_sessions=1), stored=True)
        assert await gate.admit(grant, "ts_ending") is grant
        live = Live(grant, "ts_ending")
        on_its_way, land = asyncio.Event(), asyncio.Event()
        real_renew = store.renew_slots

        async def renew_slots(slots: list[tuple[str, str]]) -> None:
            on_its_way.set()
            await land.wait()  # the session ends while the renewal is on its way
            await real_renew(slots)

        monkeypatch.setattr(store, "renew_slots", renew_slots)
        tick = asyncio.create_task(gate.tick([live]))  # type: ignore[list-item]
        async with asyncio.timeout(10):
            await on_its_way.wait()
        await gate.end(grant, "ts_ending", "LOCAL", "m", "client_close", 1.0)
        land.set()
        await tick
        assert await store.client.zcard("tg:slots:key_renew") == 0


class TestQuotaAfterARestart:
    async def test_a_used_up_key_stays_used_up_after_a_restart(self, tmp_path: Path) -> None:
        # SQLite counts a key's audio from its usage records when the process starts.
        # Records stored rounded to 1 ms summed to 2.999 s here: after a restart
        # the used-up key was let in again, and its session cut at its first chunk.
        path = tmp_path / "store.db"
        quota = KeyLimits(audio_minutes=0.05)  # 3 s
        sessions = [7 / 16000, 7 / 16000, 3.0 - 14 / 16000]  # 7 samples, 7, the rest
        store = SqliteStore(path)
        await store.start()
        try:
            gate = Admission(Settings(), store)
            for n, seconds in enumerate(sessions):
                grant = Grant("key_q", "q", quota, stored=False)
                assert await gate.admit(grant, f"s{n}") is grant
                grant.used = seconds
                await gate.end(grant, f"s{n}", "LOCAL", "m", "closed", seconds)
            await gate.flush_usage()
            assert grant.used_up()
        finally:
            await store.aclose()
        again = SqliteStore(path)
        await again.start()
        try:
            grant = Grant("key_q", "q", quota, stored=False)
            refusal = await Admission(Settings(), again).admit(grant, "s3")
            assert isinstance(refusal, Refusal) and refusal.code == "quota_exceeded"
        finally:
            await again.aclose()
