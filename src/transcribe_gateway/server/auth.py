"""API key checks: constant-time comparison, and keys never in clear in logs."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def fingerprint(key: str) -> str:
    """A short, non-reversible id for logs (first 8 hex of SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class KeyChecker:
    """Verify presented keys against the configured ones.

    Keys are kept only as SHA-256 digests and compared with
    :func:`hmac.compare_digest` over fixed-length digests, so the time taken
    depends neither on the key nor on how much of it matches.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __len__(self) -> int:
        return len(self._digests)

    def has_fingerprint(self, fp: str) -> bool:
        """Whether a configured key has this :func:`fingerprint` (a session token's key)."""
        return any(hmac.compare_digest(d.hex()[:8], fp) for d in self._digests)

    def verify(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = False
        for known in self._digests:  # no early exit: same work whichever key matches
            found |= hmac.compare_digest(digest, known)
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
