"""API keys kept in a store: records, limits, hashing, and the store interface.

A key is shown once, when it is created; the store keeps only its SHA-256.
A plain (unsalted, fast) hash is enough here because the keys are 256-bit
random strings, not passwords: nobody can brute-force or dictionary-attack
that space, so a slow KDF would only cost time on every connection.  A plain
digest also lets the store find the key by an indexed lookup.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from transcribe_gateway.store.usage import Period, UsageRecord, UsageRow

KEY_PREFIX: Final = "tgk_"
"""Prefix of generated keys: recognisable in a config file or a leaked paste."""

SCOPE_TRANSCRIBE: Final = "transcribe"
SCOPE_USAGE: Final = "usage"
DEFAULT_SCOPES: Final = (SCOPE_TRANSCRIBE, SCOPE_USAGE)
TOKEN_CLOCK_SKEW_S: Final = 300
"""How far clocks may disagree (replicas', or one machine's after a step) before a
used session token could verify again: the ledger keeps it this long past expiry."""


def generate_key() -> str:
    """A new secret key: 32 random bytes, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    """The at-rest form of a key (hex SHA-256)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key limits; 0 means no limit."""

    max_sessions: int = 0
    """Concurrent sessions (over it: ``error`` then close 4029)."""
    audio_minutes: float = 0.0
    """Audio minutes per :attr:`period` (over it: ``error`` then close 4029)."""
    period: Period = "month"
    messages_per_second: float = 0.0
    """Client messages per second, a whole number (over it: messages wait for the
    next second, the socket unread meanwhile)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key, without its secret."""

    id: str
    """Public id (``key_<hex>``): what logs, leases and usage records name."""
    name: str
    key_hash: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    limits: KeyLimits = field(default_factory=KeyLimits)

    def status(self, now: float | None = None) -> Literal["active", "revoked", "expired"]:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


NO_LIMITS: Final = KeyLimits()


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


_KEY_ID: Final = re.compile(r"key_[0-9a-f]{12}")


def looks_like_key_id(name: str) -> bool:
    """True for a name of :func:`new_key_id`'s form (``key_`` and 12 hex digits)."""
    return _KEY_ID.fullmatch(name) is not None


def new_key(
    name: str,
    *,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
    limits: KeyLimits = NO_LIMITS,
    expires_at: float | None = None,
) -> tuple[KeyRecord, str]:
    """A new key's record (what a store keeps) and its secret (shown once)."""
    secret = generate_key()
    record = KeyRecord(
        id=new_key_id(),
        name=name,
        key_hash=hash_key(secret),
        created_at=time.time(),
        expires_at=expires_at,
        scopes=scopes,
        limits=limits,
    )
    return record, secret


class KeyExistsError(ValueError):
    """A key with this name exists already."""


MAX_SESSIONS_LIMIT: Final = 1_000_000
MAX_EXPIRY_DAYS: Final = 36_600
"""About 100 years: a later expiry is not a date a calendar (or ``keys list``) can show."""


def check_new_key(name: str, limits: KeyLimits, expires_at: float | None) -> None:
    """Refuse what would make a key unusable or unreadable (NaN, infinity, negatives).

    Raises:
        ValueError: naming what is wrong.
    """
    if not name.strip():
        raise ValueError("the key's name is empty")
    # Commands take a key's name or id: a name that could be another key's id
    # would make them ambiguous.
    if looks_like_key_id(name):
        raise ValueError(f"the key's name {name!r} looks like a key id (key_ and 12 hex digits)")
    if not 0 <= limits.max_sessions <= MAX_SESSIONS_LIMIT:
        raise ValueError(f"max_sessions must be 0 to {MAX_SESSIONS_LIMIT} (0: no limit)")
    for what, value in (
        ("audio_minutes", limits.audio_minutes),
        ("messages_per_second", limits.messages_per_second),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} must be a finite number >= 0 (0: no limit), not {value}")
    # The rate is counted in whole messages per one-second window: 0.5 would let one through.
    if not float(limits.messages_per_second).is_integer():
        raise ValueError(
            "messages_per_second must be a whole number of messages per second, "
            f"not {limits.messages_per_second}"
        )
    if limits.period not in ("day", "month"):
        raise ValueError(f"period must be day or month, not {limits.period!r}")
    if expires_at is not None and not (
        math.isfinite(expires_at) and expires_at <= time.time() + MAX_EXPIRY_DAYS * 86400
    ):
        raise ValueError(f"the expiry must be a date within {MAX_EXPIRY_DAYS} days")


class Store(Protocol):
    """Keys, usage records and the live per-key state (session slots, rates, audio).

    One gateway process with the SQLite backend keeps the live state in memory;
    with Redis all replicas share it.  Every method may do I/O: none blocks the
    event loop.
    """

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def ping(self) -> bool:
        """True when the backend answers (``/readyz``)."""
        ...

    # keys
    async def create_key(
        self,
        name: str,
        *,
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
        limits: KeyLimits = NO_LIMITS,
        expires_at: float | None = None,
    ) -> tuple[KeyRecord, str]:
        """Create a key; returns its record and the secret (shown once).

        Raises:
            KeyExistsError: the name is taken.
        """
        ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, name: str) -> bool:
        """Revoke the key named ``name``, or else the key of that id (one key at most);
        False when that key is not active or there is none."""
        ...

    async def find_key(self, secret: str) -> KeyRecord | None:
        """The record whose hash matches ``secret`` (any status)."""
        ...

    async def get_keys(self, key_ids: list[str]) -> dict[str, KeyRecord]: ...

    # usage
    async def record_usage(self, record: UsageRecord) -> None: ...

    async def usage_report(self, key_id: str | None, period: Period) -> list[UsageRow]: ...

    # live state
    async def acquire_slot(self, key_id: str, session_id: str, limit: int) -> bool:
        """Take one of ``limit`` concurrent-session slots (a lease) for the session."""
        ...

    async def renew_slots(self, slots: list[tuple[str, str]]) -> None:
        """Extend the leases of live sessions ``(key_id, session_id)``, re-taking lapsed ones."""
        ...

    async def release_slot(self, key_id: str, session_id: str) -> None: ...

    async def meter_audio(
        self, key_id: str, period_id: str, session_id: str, seconds: float
    ) -> float:
        """Meter a session's audio: ``seconds`` is all it has used so far.

        The key's total in the period grows by what is new since the session's
        last call, nothing when ``seconds`` is not more; so a call retried after
        its answer was lost (though it ran), or two calls crossing, count the
        session's audio once. Returns the key's total; ``seconds`` 0 reads it.
        """
        ...

    async def add_messages(self, key_id: str, window: int, count: int) -> int:
        """Count messages in a one-second window; returns the key's total in it."""
        ...

    # session tokens
    async def claim(self, token_id: str, expires_at: float) -> bool:
        """Single-use token ledger: True the first time ``token_id`` is claimed.

        The record is kept :data:`TOKEN_CLOCK_SKEW_S` past the token's expiry, and
        outlives a restart: a token used before it must stay used after it.
        """
        ...
