"""The Redis (or Valkey) client every service that needs one uses."""

from __future__ import annotations

import logging

import redis.asyncio as redis

from services.runtime.config import RedisConfig

logger = logging.getLogger(__name__)


def connect(config: RedisConfig) -> redis.Redis:
    """A pooled client; short timeouts, since every caller has a fallback."""
    return redis.Redis.from_url(
        config.url,
        decode_responses=True,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=15,
    )
