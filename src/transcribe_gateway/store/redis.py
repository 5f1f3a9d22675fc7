"""Redis store: keys, usage and live limits shared by N gateway replicas.

Layout (all names under ``tg:``):

* ``key:<id>`` (JSON record), ``keyhash:<sha256>`` and ``keyname:<name>`` (-> id),
  ``keys`` (set of ids);
* ``slots:<key id>``: sorted set of session ids scored by lease expiry (ms, Redis
  clock).  Each replica renews its live sessions' leases; a replica that dies
  stops renewing, and its slots are dropped once they expire, so a crash never
  leaves sessions counted forever;
* ``audio:<key id>:<period>``: metered audio seconds (``INCRBYFLOAT``), and
  ``audio:session:<key id>:<session id>``: what of it each session has used (a day
  after its last metering: a retried call counts once);
* ``rate:<key id>:<unix second>``: messages in that second;
* ``usage:log`` (stream of records) and ``usage:<day|month>:<period>`` (hash of
  per-key totals), ``usage:periods:<day|month>`` (sorted set of period ids),
  ``usage:recorded:<key id>:<session id>`` (a day: a retried write counts once);
* ``token:<id>``: single-use token ledger (``SET NX``, kept until the token's
  expiry plus :data:`TOKEN_CLOCK_SKEW_S`).

Times for leases come from Redis (``TIME``), so replicas' clocks need not agree
for them; a token's expiry is read on each replica's own clock.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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
from transcribe_gateway.store.usage import Period, UsageRecord, UsageRow, period_id

P: Final = "tg:"
_NETWORK_TIMEOUT_S: Final = 2.0
_AUDIO_TTL_S: Final = 40 * 86400
"""Metered audio outlives the longest period (a month) it counts towards."""
_USAGE_LOG_MAX: Final = 1_000_000

_ACQUIRE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# Plain ZADD, not XX: a live session whose lease lapsed (renewals failed for longer
# than the lease, or Redis restarted without its data) counts again.  A renewal
# racing the session's release could bring its slot back: the tick releases the
# slots of sessions that ended meanwhile once more (server/limits.py).
_RENEW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


# A session's record once: a write retried after a timeout may have run already
# (the marker outlives any retry).
_RECORD_USAGE: Final = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[9]) then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[8], '*', 'record', ARGV[1])
for i = 0, 1 do
  local totals = KEYS[3 + i]
  redis.call('HINCRBY', totals, ARGV[2] .. '|sessions', 1)
  redis.call('HINCRBYFLOAT', totals, ARGV[2] .. '|seconds', ARGV[3])
  redis.call('HSET', totals, ARGV[2] .. '|name', ARGV[4])
  redis.call('ZADD', KEYS[5 + i], ARGV[7], ARGV[5 + i])
end
return 1
"""
_RECORDED_TTL_S: Final = 86400

# A session's audio metered by its running total: only what is new since its last
# call is added, so a call retried after a lost answer, or two crossing, add it once.
_METER_AUDIO: Final = """
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
local seconds = tonumber(ARGV[1])
if seconds <= before then
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return redis.call('GET', KEYS[1]) or '0'
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
local total = redis.call('INCRBYFLOAT', KEYS[1], seconds - before)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return total
"""


_REPORT_BATCH: Final = 500
"""Periods read per pipelined round trip by a usage report (bounds one reply's size)."""


def _fields(key_id: str) -> list[str]:
    """A key's fields in a ``usage:<day|month>:<period>`` hash."""
    return [f"{key_id}|sessions", f"{key_id}|seconds", f"{key_id}|name"]


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode(record: KeyRecord) -> str:
    data = asdict(record)
    data["scopes"] = list(record.scopes)
    return json.dumps(data)


def _decode(raw: str | bytes) -> KeyRecord:
    data: dict[str, Any] = json.loads(raw)
    data["scopes"] = tuple(data["scopes"])
    data["limits"] = KeyLimits(**data["limits"])
    return KeyRecord(**data)


class RedisStore:
    """All state in one Redis, shared by every replica that points at it."""

    def __init__(self, url: str, *, lease_ttl_s: float = 30.0) -> None:
        self.url = url
        self.lease_ttl_ms = round(lease_ttl_s * 1000)
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=_NETWORK_TIMEOUT_S,
            socket_connect_timeout=_NETWORK_TIMEOUT_S,
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._record_usage = self._redis.register_script(_RECORD_USAGE)
        self._meter_audio = self._redis.register_script(_METER_AUDIO)

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    async def start(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

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
        # The name is claimed first (SET NX), so two concurrent creates cannot share it.
        if not await self._redis.set(f"{P}keyname:{name}", record.id, nx=True):
            raise KeyExistsError(f"a key named {name!r} exists already")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{P}key:{record.id}", _encode(record))
            pipe.set(f"{P}keyhash:{record.key_hash}", record.id)
            pipe.sadd(f"{P}keys", record.id)
            await pipe.execute()
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        ids = sorted(_str(x) for x in await self._redis.smembers(f"{P}keys"))
        records = await self.get_keys(ids)
        return sorted(records.values(), key=lambda r: r.created_at)

    async def revoke_key(self, name: str) -> bool:
        key_id = _str(await self._redis.get(f"{P}keyname:{name}") or name)
        found = (await self.get_keys([key_id])).get(key_id)
        if found is None or found.revoked_at is not None:
            return False
        data = json.loads(_encode(found))
        data["revoked_at"] = time.time()
        await self._redis.set(f"{P}key:{key_id}", json.dumps(data))
        return True

    async def find_key(self, secret: str) -> KeyRecord | None:
        raw = await self._redis.get(f"{P}keyhash:{hash_key(secret)}")
        if raw is None:
            return None
        key_id = _str(raw)
        return (await self.get_keys([key_id])).get(key_id)

    async def get_keys(self, key_ids: list[str]) -> dict[str, KeyRecord]:
        if not key_ids:
            return {}
        raws = await self._redis.mget([f"{P}key:{k}" for k in key_ids])
        return {k: _decode(raw) for k, raw in zip(key_ids, raws, strict=True) if raw is not None}

    # ----------------------------------------------------------------- usage

    async def record_usage(self, record: UsageRecord) -> None:
        day = period_id("day", record.started_at)
        month = period_id("month", record.started_at)
        await self._record_usage(
            keys=[
                f"{P}usage:log",
                f"{P}usage:recorded:{record.key_id}:{record.session_id}",
                f"{P}usage:day:{day}",
                f"{P}usage:month:{month}",
                f"{P}usage:periods:day",
                f"{P}usage:periods:month",
            ],
            args=[
                json.dumps(asdict(record)),
                record.key_id,
                repr(float(record.audio_seconds)),
                record.key_name,
                day,
                month,
                repr(float(record.started_at)),
                _USAGE_LOG_MAX,
                _RECORDED_TTL_S,
            ],
        )

    async def usage_report(self, key_id: str | None, period: Period) -> list[UsageRow]:
        found: Any = await self._redis.zrevrange(f"{P}usage:periods:{period}", 0, -1)
        periods = [_str(p) for p in found]
        fields = _fields(key_id) if key_id is not None else []
        rows: list[UsageRow] = []
        for start in range(0, len(periods), _REPORT_BATCH):
            batch = periods[start : start + _REPORT_BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for pid in batch:
                    if key_id is None:
                        pipe.hgetall(f"{P}usage:{period}:{pid}")
                    else:
                        # Only this key's fields: a period's hash holds every key's totals,
                        # and one key's report (GET /v1/usage) must not cost all of them.
                        pipe.hmget(f"{P}usage:{period}:{pid}", fields)
                replies: list[Any] = await pipe.execute()
            for pid, reply in zip(batch, replies, strict=True):
                if key_id is None:
                    totals = {_str(k): _str(v) for k, v in reply.items()}
                    ids = sorted({f.split("|", 1)[0] for f in totals})
                else:
                    if all(v is None for v in reply):
                        continue  # the key has no records in this period
                    totals = {
                        f: _str(v) for f, v in zip(fields, reply, strict=True) if v is not None
                    }
                    ids = [key_id]
                rows.extend(
                    UsageRow(
                        kid,
                        totals.get(f"{kid}|name", kid),
                        pid,
                        int(totals.get(f"{kid}|sessions", 0)),
                        float(totals.get(f"{kid}|seconds", 0.0)),
                    )
                    for kid in ids
                )
        rows.sort(key=lambda r: (r.key_name, r.key_id))
        rows.sort(key=lambda r: r.period, reverse=True)  # stable: newest period first
        return rows

    # ------------------------------------------------------------ live state

    async def acquire_slot(self, key_id: str, session_id: str, limit: int) -> bool:
        got = await self._acquire(
            keys=[f"{P}slots:{key_id}"], args=[session_id, limit, self.lease_ttl_ms]
        )
        return bool(int(got))

    async def renew_slots(self, slots: list[tuple[str, str]]) -> None:
        by_key: dict[str, list[str]] = {}
        for key_id, session_id in slots:
            by_key.setdefault(key_id, []).append(session_id)
        if not by_key:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key_id, sessions in by_key.items():
                await self._renew(
                    keys=[f"{P}slots:{key_id}"], args=[self.lease_ttl_ms, *sessions], client=pipe
                )
            await pipe.execute()

    async def release_slot(self, key_id: str, session_id: str) -> None:
        await self._redis.zrem(f"{P}slots:{key_id}", session_id)

    async def meter_audio(
        self, key_id: str, period_id: str, session_id: str, seconds: float
    ) -> float:
        total = await self._meter_audio(
            keys=[f"{P}audio:{key_id}:{period_id}", f"{P}audio:session:{key_id}:{session_id}"],
            args=[repr(float(seconds)), _AUDIO_TTL_S, _RECORDED_TTL_S],
        )
        return float(total)

    async def add_messages(self, key_id: str, window: int, count: int) -> int:
        name = f"{P}rate:{key_id}:{window}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(name, count)
            pipe.expire(name, 5)
            total, _ = await pipe.execute()
        return int(total)

    # ---------------------------------------------------------------- tokens

    async def claim(self, token_id: str, expires_at: float) -> bool:
        """Single-use token ledger: True the first time ``token_id`` is claimed, on any replica.

        The record outlives the token by :data:`TOKEN_CLOCK_SKEW_S`: a replica whose
        clock runs behind the claiming one's still takes the token as unexpired
        for that long, and must still find it used.
        """
        ttl_ms = max(1000, round((expires_at - time.time() + TOKEN_CLOCK_SKEW_S) * 1000))
        return bool(await self._redis.set(f"{P}token:{token_id}", "1", nx=True, px=ttl_ms))
