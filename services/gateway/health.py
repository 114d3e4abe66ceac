"""The runbook's model health cache in Redis: ``health:{provider}:{model}``.

``"0"`` means failing and expires after the configured TTL; ``"1"`` means the
last call succeeded; no key means unchecked. Redis is an optimisation here,
never a dependency: when it cannot be reached every read says "unchecked",
writes are dropped, and Redis is left alone for a few seconds so that a dead
Redis costs one timeout per few seconds instead of one per request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from enum import StrEnum

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.gateway.config import ModelRef

logger = logging.getLogger(__name__)

_PAUSE_AFTER_ERROR_S = 5.0


class Health(StrEnum):
    HEALTHY = "healthy"
    FAILING = "failing"
    UNCHECKED = "unchecked"
    WARMING = "warming"


class HealthCacheUnavailable(Exception):
    """Redis could not be reached for an operation that needs it."""


class HealthCache:
    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._paused_until = 0.0

    async def read(self, refs: Sequence[ModelRef]) -> dict[ModelRef, Health]:
        """Each model's cached health; all unchecked when Redis is away."""
        unchecked = dict.fromkeys(refs, Health.UNCHECKED)
        if not refs or self._paused():
            return unchecked
        try:
            values = await self._redis.mget([ref.health_key for ref in refs])
        except RedisError as exc:
            self._pause(exc)
            return unchecked
        self._resume()
        return {
            ref: _HEALTH.get(_text(value) or "", Health.UNCHECKED)
            for ref, value in zip(refs, values, strict=True)
        }

    async def mark_failing(self, ref: ModelRef, retry_after_s: float | None) -> None:
        """``"0"`` for the TTL, or shorter when the provider said when to retry."""
        ttl_s = (
            self._ttl_s if retry_after_s is None else min(self._ttl_s, retry_after_s)
        )
        await self._set(ref, "0", max(1, math.ceil(ttl_s * 1000)))

    async def mark_healthy(self, ref: ModelRef) -> None:
        await self._set(ref, "1", None)

    async def clear(self, ref: ModelRef) -> bool:
        """Forgets a model's health; True when there was something to forget."""
        try:
            deleted = await self._redis.delete(ref.health_key)
        except RedisError as exc:
            raise HealthCacheUnavailable(str(exc)) from exc
        self._resume()
        logger.info("health cleared provider=%s model=%s", ref.provider, ref.model)
        return bool(deleted)

    async def _set(self, ref: ModelRef, value: str, ttl_ms: int | None) -> None:
        if self._paused():
            return
        try:
            await self._redis.set(ref.health_key, value, px=ttl_ms)
        except RedisError as exc:
            self._pause(exc)
            return
        self._resume()

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _pause(self, exc: RedisError) -> None:
        if self._paused_until == 0.0:
            logger.warning("health cache unreachable, serving without it: %s", exc)
        self._paused_until = time.monotonic() + _PAUSE_AFTER_ERROR_S

    def _resume(self) -> None:
        if self._paused_until != 0.0:
            logger.info("health cache reachable again")
            self._paused_until = 0.0


_HEALTH = {"0": Health.FAILING, "1": Health.HEALTHY}


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
