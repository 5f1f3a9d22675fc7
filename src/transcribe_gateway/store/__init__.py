"""Key store, usage records and shared live state (SQLite for one box, Redis for many)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transcribe_gateway.config import StoreSettings
    from transcribe_gateway.store.keys import Store


def open_store(settings: StoreSettings) -> Store:
    """The configured backend (not started yet)."""
    if settings.backend == "redis":
        from transcribe_gateway.store.redis import RedisStore

        return RedisStore(settings.redis_url, lease_ttl_s=settings.lease_ttl_s)
    from transcribe_gateway.store.sqlite import SqliteStore

    return SqliteStore(settings.path)
