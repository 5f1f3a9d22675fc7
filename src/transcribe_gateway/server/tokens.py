"""Short-lived, single-use session tokens for browsers (``POST /v1/tokens``).

A page must never hold a long-lived API key.  A backend that has one asks
``POST /v1/tokens`` for a token and hands it to the page, which sends it in the
``auth`` first message.  A token is self-contained and signed, so any replica
that shares ``token_secret`` verifies it without a shared database::

    tst_<payload>.<signature>
    payload   = base64url(JSON {"v": 1, "jti": <random id>, "kid": <key id>, "exp": <unix s>})
    signature = base64url(HMAC-SHA256(token_secret, "tst_" + payload))

``kid`` names the key that asked for the token (``static-<fingerprint>`` for a
key from ``api_keys``, the store's id for a managed key), so the session counts
against that key's limits.  Single use is enforced by a :class:`TokenLedger`:
the first ``claim`` of a token id wins.  The gateway's store is its ledger
(SQLite's file outlives a restart; Redis is shared by replicas);
:class:`MemoryTokenLedger` serves one process for as long as it runs.

An expired, forged or already-used token is refused exactly like a bad key
(close 4001), and a token never reaches the logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Protocol

from transcribe_gateway.server.limits import Admission, Grant, Refusal
from transcribe_gateway.store.keys import TOKEN_CLOCK_SKEW_S

log = logging.getLogger(__name__)

PREFIX: Final = "tst_"
"""Every token starts with this, so it is told from an API key without a lookup."""
DEFAULT_TTL_S: Final = 60
MIN_TTL_S: Final = 1
_VERSION: Final = 1
_MAX_TOKEN_CHARS: Final = 512


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token says."""

    token_id: str
    key_id: str
    """The key the token was issued for (``static-<fingerprint>`` or a store id)."""
    expires_at: float
    """Unix seconds."""


class TokenLedger(Protocol):
    """Remembers which tokens were used, until they expire on their own."""

    async def claim(self, token_id: str, expires_at: float) -> bool:
        """Mark ``token_id`` used; True the first time, False ever after (until expiry)."""
        ...


class MemoryTokenLedger:
    """A :class:`TokenLedger` for one process.

    Entries are dropped :data:`TOKEN_CLOCK_SKEW_S` after their token expired (it
    can no longer verify by then, even after the clock steps back).  The ledger
    is bounded: past ``max_entries`` live tokens a claim is refused rather than
    letting an old entry go, since forgetting one would let that token be used
    twice.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._used: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._used)

    async def claim(self, token_id: str, expires_at: float) -> bool:
        self._expire(time.time() - TOKEN_CLOCK_SKEW_S)
        if token_id in self._used or len(self._used) >= self._max:
            return False
        self._used[token_id] = expires_at
        # Tokens mostly expire in claim order; a longer TTL claimed later just waits its turn.
        return True

    def _expire(self, cutoff: float) -> None:
        while self._used:
            token_id, expires_at = next(iter(self._used.items()))
            if expires_at > cutoff:
                break
            del self._used[token_id]
        if len(self._used) >= self._max:  # out-of-order TTLs: a full sweep, rarely
            for token_id in [t for t, exp in self._used.items() if exp <= cutoff]:
                del self._used[token_id]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def looks_like_token(credential: str) -> bool:
    """Whether ``credential`` is shaped like a session token rather than an API key."""
    return credential.startswith(PREFIX)


class TokenIssuer:
    """Mint and check tokens with one secret; single use through a ledger.

    Args:
        secret: the HMAC key; replicas must share it.  ``None`` or empty: a random
            per-process secret (tokens then only work on the replica that made them).
        max_ttl_s: longest TTL a caller may ask for.
        ledger: where used token ids are kept (default: this process's memory).
    """

    def __init__(
        self, secret: str | None, max_ttl_s: int, ledger: TokenLedger | None = None
    ) -> None:
        if not secret:
            log.warning(
                "token_secret is not set: using a random per-process secret; replicas "
                "behind one load balancer need a shared TRANSCRIBE_TOKEN_SECRET"
            )
            secret = secrets.token_urlsafe(32)
        self._key = hashlib.sha256(secret.encode()).digest()
        self.max_ttl_s = max_ttl_s
        self.ledger: TokenLedger = ledger or MemoryTokenLedger()

    def ttl_for(self, requested: int | None) -> int:
        """The TTL granted for ``requested`` seconds: default 60, capped by ``max_ttl_s``."""
        ttl = DEFAULT_TTL_S if requested is None else requested
        return max(MIN_TTL_S, min(ttl, self.max_ttl_s))

    def issue(self, key_id: str, ttl_s: int, *, now: float | None = None) -> tuple[str, float]:
        """Mint a token for ``key_id``.

        Returns:
            The token and its expiry (unix seconds).
        """
        # Rounded up: a token lives at least the ttl_s it is sold with.
        expires_at = float(math.ceil((now if now is not None else time.time()) + ttl_s))
        claims: dict[str, object] = {
            "v": _VERSION,
            "jti": secrets.token_urlsafe(12),
            "kid": key_id,
            "exp": int(expires_at),
        }
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._sign(PREFIX + payload)}", expires_at

    def verify(self, token: str, *, now: float | None = None) -> TokenClaims | None:
        """The token's claims if it is well formed, signed with our secret and not expired."""
        if not looks_like_token(token) or len(token) > _MAX_TOKEN_CHARS:
            return None
        body, dot, signature = token.rpartition(".")
        # Bytes, not str: compare_digest raises TypeError on non-ASCII str, and
        # "tst_x.é" must be refused like any forgery (found by tests/reliability).
        presented = signature.encode("utf-8", "surrogatepass")
        if not dot or not hmac.compare_digest(self._sign(body).encode(), presented):
            return None
        try:
            claims = json.loads(_b64decode(body[len(PREFIX) :]))
            token_id, key_id, expires_at = claims["jti"], claims["kid"], claims["exp"]
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if claims.get("v") != _VERSION or not isinstance(expires_at, int):
            return None
        if not (isinstance(token_id, str) and isinstance(key_id, str)):
            return None
        if expires_at <= (now if now is not None else time.time()):
            return None
        return TokenClaims(token_id, key_id, float(expires_at))

    async def redeem(self, token: str) -> TokenClaims | None:
        """Verify ``token`` and use it up: its claims the first time, else ``None``."""
        claims = self.verify(token)
        if claims is None or not await self.ledger.claim(claims.token_id, claims.expires_at):
            return None
        return claims

    def _sign(self, body: str) -> str:
        return _b64encode(hmac.new(self._key, body.encode(), hashlib.sha256).digest())


async def admit(
    issuer: TokenIssuer, admission: Admission, token: str, session_id: str
) -> Grant | Refusal:
    """Authenticate a session with a token: use it up, then admit its key as for the key itself.

    The token is spent even when its key is then refused (over quota, too many
    sessions): a token is one attempt, not one successful session.
    """
    claims = await issuer.redeem(token)
    if claims is None:
        return Refusal("", "Unauthorized", 4001)
    grant = await admission.identify_id(claims.key_id)
    if isinstance(grant, Refusal):
        return grant
    return await admission.admit(grant, session_id)
