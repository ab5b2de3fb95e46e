"""Brokers: where a session's events are stored, and how they reach every process."""

from __future__ import annotations

from ..config import Settings
from .base import Broker
from .memory import MemoryBroker


def create_broker(settings: Settings) -> Broker:
    """The broker ``settings.broker`` names (Redis is imported only when asked for)."""
    if settings.broker == "redis":
        from .redis import RedisBroker

        return RedisBroker(
            settings.redis_url,
            settings.buffer_size,
            settings.session_ttl,
            key_prefix=settings.redis_key_prefix,
        )
    return MemoryBroker(settings.buffer_size, settings.session_ttl)
