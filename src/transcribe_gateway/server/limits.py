"""Who may open a session, and the per-key limits while it runs.

:class:`Admission` (one per process) checks a presented key, static
(``api_keys``) first, then the store; takes a concurrent-session slot; and
runs the periodic ops tick that

* re-checks the keys of open sessions, so a revoked or expired key's sessions
  get ``error`` ``unauthorized`` and close 4001 within ``recheck_interval_s``;
* meters audio into the store and closes a session whose key went over its
  audio-minutes quota (``error`` ``quota_exceeded``, close 4029);
* renews the session-slot leases (Redis), and shares message counts.

Usage records are billing data: each is written in the background when its
session ends, and retried with backoff while the store stalls or fails
(:data:`USAGE_RETRY_S`); what is still waiting at shutdown gets
:data:`USAGE_FLUSH_S` before the store is closed.

:class:`SessionLimits` (one per session) meters its audio against the quota.
Message rate: a message over the key's rate waits, unparsed, for the next
second (the session stops reading meanwhile: backpressure), so a client that
sends faster than the rate (a file, a flood) is slowed to it and nothing it
sent is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from transcribe_gateway.server import metrics
from transcribe_gateway.server.auth import KeyChecker, fingerprint
from transcribe_gateway.store.keys import SCOPE_TRANSCRIBE, KeyLimits, KeyRecord, Store
from transcribe_gateway.store.usage import UsageRecord, period_id

if TYPE_CHECKING:
    from transcribe_gateway.config import Settings
    from transcribe_gateway.server.connection import Connection

log = logging.getLogger(__name__)

_STORE_TIMEOUT_S: Final = 5.0
_RATE_SYNC_S: Final = 0.1
USAGE_ATTEMPT_TIMEOUT_S: Final = 30.0
"""One attempt at a usage record: well past SQLite's 5 s busy timeout (a lock held by
another process), so an attempt ends with the store's own answer, not ours."""
USAGE_BACKOFF_S: Final = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Pauses between attempts (the last one repeats)."""
USAGE_RETRY_S: Final = 600.0
"""A record whose store fails for this long is given up (logged in full, at ERROR)."""
USAGE_PENDING_MAX: Final = 10_000
"""Records waiting for the store at most (memory bound while it is away)."""
USAGE_FLUSH_S: Final = 30.0
"""At shutdown, how long records still waiting may take before the store is closed."""
OPS_STOP_S: Final = USAGE_FLUSH_S + 10.0
"""At shutdown, how long the ops tick (which flushes the records first) may take to stop."""


def _cancelling() -> bool:
    """True once the current task was asked to stop, even if the request was swallowed.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py uses for its socket
    timeouts) returns the result instead of raising ``CancelledError`` when the
    call completes as the task is cancelled (CPython gh-86296, fixed in 3.12): a
    loop that only waits for the exception would then run on for ever.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _fields(record: UsageRecord) -> dict[str, object]:
    """A usage record as log fields: enough to write it by hand when it was lost."""
    return {
        "session_id": record.session_id,
        "key": record.key_id,
        "key_name": record.key_name,
        "provider": record.provider,
        "model": record.model,
        "audio_seconds": record.audio_seconds,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "close_reason": record.close_reason,
    }


QUOTA_SLACK_S = 1e-6
"""A sum of 20 ms chunks is not exact in floating point: a key's exact
allowance is neither over it nor short of it."""


@dataclass(slots=True)
class Grant:
    """An accepted key and the limits that apply to the session."""

    key_id: str
    key_name: str
    limits: KeyLimits
    stored: bool
    """From the store (re-checked for revocation) rather than ``api_keys``."""
    scopes: tuple[str, ...] = ()
    period_id: str = ""
    audio_total: float = 0.0
    """The key's metered audio seconds in the period, as last read from the store."""
    used: float = 0.0
    """This session's audio seconds so far (metered or not)."""
    metered: float = 0.0
    """How much of :attr:`used` the store has counted, as far as its answers tell."""
    started_at: float = field(default_factory=time.time)
    released: bool = False
    """The session ended and gave its slot back (renewals must not bring it back)."""

    @property
    def audio_limit_s(self) -> float:
        return self.limits.audio_minutes * 60

    def over_quota(self) -> bool:
        return self.seconds_over() > QUOTA_SLACK_S

    def used_up(self) -> bool:
        """Whether the key has no allowance left in the period."""
        return self.seconds_over() >= -QUOTA_SLACK_S

    def seconds_over(self) -> float:
        """Seconds past the key's allowance (negative: what is left); -inf without one."""
        limit = self.audio_limit_s
        if not limit:
            return float("-inf")
        return self.audio_total + self.used - self.metered - limit


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    """``error`` code, or empty for a bare 4001."""
    message: str
    close_code: int


@dataclass(slots=True)
class _Window:
    """A key's message count in the current second, in this process and overall."""

    second: int = 0
    local: int = 0
    pushed: int = 0
    others: int = 0


class Admission:
    """Key checks, session slots, metering and the periodic ops tick (one per process)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.static = KeyChecker(settings.keys())
        self.shared = settings.store.backend == "redis"
        self._rates: dict[str, _Window] = {}
        self._releases: set[asyncio.Task[None]] = set()
        """Slots given back after their acquire lost its answer (owned until done)."""
        self._usage_writes: set[asyncio.Task[None]] = set()
        """Usage records being written (owned until written or given up)."""

    # ------------------------------------------------------------ admission

    async def authenticate(self, token: str, session_id: str) -> Grant | Refusal:
        """Check ``token`` and take a session slot for it."""
        grant = await self.identify(token)
        if isinstance(grant, Refusal):
            return grant
        return await self.admit(grant, session_id)

    async def identify(self, token: str) -> Grant | Refusal:
        """The key ``token`` is, with its limits (no slot taken)."""
        if self.static.verify(token):
            return self._static_grant(fingerprint(token))
        async with asyncio.timeout(_STORE_TIMEOUT_S):
            record = await self.store.find_key(token)
        return self._stored_grant(record)

    async def identify_id(self, key_id: str) -> Grant | Refusal:
        """The key of id ``key_id`` (a session token's key), if it is still in force."""
        if key_id.startswith("static-"):
            fp = key_id.removeprefix("static-")
            if self.static.has_fingerprint(fp):
                return self._static_grant(fp)
            return Refusal("", "Unauthorized", 4001)
        async with asyncio.timeout(_STORE_TIMEOUT_S):
            records = await self.store.get_keys([key_id])
        return self._stored_grant(records.get(key_id))

    def _static_grant(self, fp: str) -> Grant:
        return Grant(
            key_id=f"static-{fp}",
            key_name=f"static:{fp}",
            limits=KeyLimits(max_sessions=self.settings.max_sessions_per_key),
            stored=False,
        )

    def _stored_grant(self, record: KeyRecord | None) -> Grant | Refusal:
        if record is None or record.status() != "active":
            return Refusal("", "Unauthorized", 4001)
        if SCOPE_TRANSCRIBE not in record.scopes:
            return Refusal("forbidden", "this key lacks the 'transcribe' scope", 4001)
        limits = record.limits
        if not limits.max_sessions and self.settings.max_sessions_per_key:
            limits = KeyLimits(
                self.settings.max_sessions_per_key,
                limits.audio_minutes,
                limits.period,
                limits.messages_per_second,
            )
        return Grant(record.id, record.name, limits, stored=True, scopes=record.scopes)

    async def admit(self, grant: Grant, session_id: str) -> Grant | Refusal:
        """Check the key's audio quota and take a session slot for ``grant``."""
        async with asyncio.timeout(_STORE_TIMEOUT_S):
            if grant.limits.audio_minutes:
                grant.period_id = period_id(grant.limits.period)
                grant.audio_total = await self.store.meter_audio(
                    grant.key_id, grant.period_id, session_id, 0.0
                )
                if grant.used_up():
                    metrics.refusals.labels(code="quota_exceeded").inc()
                    return Refusal(
                        "quota_exceeded",
                        f"this key used its {grant.limits.audio_minutes:g} audio minutes "
                        f"for {grant.period_id}",
                        4029,
                    )
            try:
                acquired = await self.store.acquire_slot(
                    grant.key_id, session_id, grant.limits.max_sessions
                )
            except BaseException:
                # Cancelled (the client left, the auth timed out) or failed: the
                # acquire may have run in Redis all the same, and nobody would renew
                # or release that slot, which would then count against the key
                # until its lease expired. Giving back a slot never taken is harmless.
                self._give_back(grant.key_id, session_id)
                raise
            if not acquired:
                metrics.refusals.labels(code="too_many_sessions").inc()
                return Refusal(
                    "too_many_sessions",
                    f"this key already has {grant.limits.max_sessions} open sessions",
                    4029,
                )
        return grant

    def _give_back(self, key_id: str, session_id: str) -> None:
        task = asyncio.create_task(self._release_quietly(key_id, session_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_quietly(self, key_id: str, session_id: str) -> None:
        try:
            async with asyncio.timeout(_STORE_TIMEOUT_S):
                await self.store.release_slot(key_id, session_id)
        except Exception:  # the store is away: the lease expires instead
            log.warning("slot not given back", exc_info=True)

    async def end(
        self, grant: Grant, session_id: str, provider: str, model: str, reason: str, audio: float
    ) -> None:
        """Free the session's slot and write its usage record (never raises).

        The record (and the session's last metered audio) is written by a task of
        its own, retried while the store stalls or fails: see :meth:`_record`.
        """
        grant.released = True
        record = UsageRecord(
            key_id=grant.key_id,
            key_name=grant.key_name,
            session_id=session_id,
            provider=provider,
            model=model,
            # Unrounded: SQLite sums the records into a key's total at start-up, and
            # records rounded to 1 ms could leave a used-up key a hair under its quota.
            audio_seconds=audio,
            started_at=grant.started_at,
            ended_at=time.time(),
            close_reason=reason,
        )
        if len(self._usage_writes) >= USAGE_PENDING_MAX:
            log.error(
                "usage not recorded: too many records wait for the store", extra=_fields(record)
            )
        else:
            task = asyncio.create_task(self._record(grant, record), name="usage-record")
            self._usage_writes.add(task)
            task.add_done_callback(self._usage_writes.discard)
        await self._release_quietly(grant.key_id, session_id)

    async def _record(self, grant: Grant, record: UsageRecord) -> None:
        """Meter the session's last audio, then write its record, retrying.

        Both count once however often they are retried (the store meters a session
        by its running total, and writes its record once), so the key's quota
        counter and its records agree.
        """
        deadline = time.monotonic() + USAGE_RETRY_S
        failures = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(USAGE_ATTEMPT_TIMEOUT_S):
                        if grant.period_id and grant.used > grant.metered:
                            await self._meter(grant, record.session_id)
                        await self.store.record_usage(record)
                except Exception as exc:  # a timeout, a lock, the store away: try again
                    if _cancelling():  # shutdown, its CancelledError swallowed on the way
                        raise asyncio.CancelledError from exc
                    pause = USAGE_BACKOFF_S[min(failures, len(USAGE_BACKOFF_S) - 1)]
                    failures += 1
                    if time.monotonic() + pause > deadline:
                        log.error(
                            "usage not recorded: the store failed for %g s",
                            USAGE_RETRY_S,
                            exc_info=True,
                            extra=_fields(record),
                        )
                        return
                    if failures == 1:
                        log.warning(
                            "usage record not written yet; retrying (%s: %s)",
                            type(exc).__name__,
                            exc,
                            extra={"session_id": record.session_id, "key": record.key_id},
                        )
                    await asyncio.sleep(pause)
                else:
                    if failures:
                        log.info(
                            "usage recorded after %d failed attempts",
                            failures,
                            extra={"session_id": record.session_id, "key": record.key_id},
                        )
                    return
        except asyncio.CancelledError:  # shutdown, past USAGE_FLUSH_S
            log.error("usage not recorded: shut down while the store failed", extra=_fields(record))
            raise

    async def flush_usage(self, timeout_s: float = USAGE_FLUSH_S) -> None:
        """Wait (bounded) for the usage records still being written; give up the rest."""
        deadline = time.monotonic() + timeout_s
        while self._usage_writes and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._usage_writes), timeout=left)
        for task in list(self._usage_writes):
            task.cancel()  # its record is logged in full as it gives up
        if self._usage_writes:
            await asyncio.wait(set(self._usage_writes))

    def check_message(self, limits: SessionLimits) -> bool:
        """Count one client message against its key's rate, if it is within it (no I/O).

        False: the key is at its rate this second; the message must wait.
        """
        rate = limits.grant.limits.messages_per_second
        if not rate:
            return True
        second = int(time.time())
        window = self._rates.get(limits.grant.key_id)
        if window is None or window.second != second:
            window = self._rates[limits.grant.key_id] = _Window(second)
        if window.local + window.others >= rate:
            return False
        window.local += 1
        return True

    # -------------------------------------------------------------- ops tick

    async def run(self, connections: Iterable[Connection]) -> None:
        """The periodic tick; runs until cancelled (owned by the Gateway)."""
        store_cfg = self.settings.store
        interval = min(store_cfg.recheck_interval_s, store_cfg.lease_ttl_s / 3)
        rate_task = asyncio.create_task(self._sync_rates()) if self.shared else None
        try:
            while not _cancelling():
                await asyncio.sleep(interval)
                try:
                    async with asyncio.timeout(_STORE_TIMEOUT_S):
                        await self.tick(list(connections))
                except Exception:  # a store hiccup must not end the loop
                    log.warning("ops tick failed", exc_info=True)
            raise asyncio.CancelledError  # cancelled, though a store call swallowed it
        finally:
            if rate_task is not None:
                rate_task.cancel()
                with contextlib.suppress(BaseException):
                    await rate_task
            # Cancelled at shutdown, before the store is closed: the records of the
            # last sessions are written first (bounded).
            await self.flush_usage()

    async def tick(self, live: list[Connection]) -> None:
        sessions = [(c, c.grant) for c in live if c.grant is not None]
        if self.shared:
            await self.store.renew_slots([(g.key_id, c.id) for c, g in sessions])
            # A session that ended while the renewal was on its way may have had its
            # slot renewed back after its release: release it again (harmless if not).
            for conn, grant in sessions:
                if grant.released:
                    await self.store.release_slot(grant.key_id, conn.id)
        stored_ids = sorted({g.key_id for _, g in sessions if g.stored})
        records: dict[str, KeyRecord] = await self.store.get_keys(stored_ids)
        for conn, grant in sessions:
            if grant.stored:
                record = records.get(grant.key_id)
                status = "revoked" if record is None else record.status()
                if status != "active":
                    conn.terminate(4001, "unauthorized", f"this key was {status}")
                    continue
            # Shared: the other replicas' audio is learnt even when this session's is not new.
            if grant.period_id and (grant.used > grant.metered or self.shared):
                await self._meter(grant, conn.id)
                if grant.over_quota():
                    conn.terminate(
                        4029,
                        "quota_exceeded",
                        f"this key used its {grant.limits.audio_minutes:g} audio minutes "
                        f"for {grant.period_id}",
                    )

    async def _meter(self, grant: Grant, session_id: str) -> None:
        """Send the session's running audio total to the store (a failure changes nothing:
        the next call sends the total again, and the store adds only what is new)."""
        used = grant.used
        grant.audio_total = await self.store.meter_audio(
            grant.key_id, grant.period_id, session_id, used
        )
        grant.metered = max(grant.metered, used)

    async def _sync_rates(self) -> None:
        """Share this process's message counts and learn the other replicas' (Redis)."""
        failing = False
        while not _cancelling():
            await asyncio.sleep(_RATE_SYNC_S)
            second = int(time.time())
            for key_id, window in list(self._rates.items()):
                if window.second < second - 1:
                    del self._rates[key_id]
                    continue
                pending = window.local - window.pushed
                try:
                    async with asyncio.timeout(_STORE_TIMEOUT_S):
                        total = await self.store.add_messages(key_id, window.second, pending)
                except Exception:
                    # Skip this round (the unpushed counts go with the next one); warn
                    # once per outage, not ten times a second.
                    if not failing:
                        log.warning("rate sync failed", exc_info=True)
                    failing = True
                    break
                if failing:
                    log.info("rate sync resumed")
                    failing = False
                window.pushed += pending
                window.others = max(0, total - window.pushed)
        raise asyncio.CancelledError  # cancelled, though a store call swallowed it


class SessionLimits:
    """One session's audio metering against its key's quota."""

    def __init__(self, grant: Grant) -> None:
        self.grant = grant

    def add_audio(self, seconds: float) -> float:
        """Meter audio for the engine; returns how much of it fits in the key's
        audio quota (all of it, or less when it takes the key over: the key is
        then metered up to its limit, and used up for the period)."""
        fits = self.fits(seconds)
        self.grant.used += fits
        return fits

    def fits(self, seconds: float) -> float:
        """How much of ``seconds`` more audio the key's quota takes (no metering)."""
        grant = self.grant
        if not grant.period_id:
            return seconds
        over = grant.seconds_over() + seconds
        return seconds if over <= QUOTA_SLACK_S else max(0.0, seconds - over)
