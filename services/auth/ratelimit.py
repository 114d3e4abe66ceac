"""The per-IP API limit of runbook §5 (200 requests / 10 s), for Envoy's ratelimit.

Each check is one Lua script in Redis over a sorted set per address: drop
the entries older than the window, count the rest, admit and record the
request only if the count is under the limit. Redis runs a script alone, so
the count is exact however many requests and auth replicas race, and the
clock is Redis's, the same for every replica. Refused requests are not
recorded. When Redis cannot be asked the request is admitted, and that is
logged once per interval rather than once per request.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from envoy.config.core.v3 import (  # type: ignore[import-untyped]  # xds-protos ships no stubs
    base_pb2,
)
from envoy.service.ratelimit.v3 import (  # type: ignore[import-untyped]  # as above
    rls_pb2,
    rls_pb2_grpc,
)
from redis.exceptions import RedisError

from services.auth import metrics

logger = logging.getLogger(__name__)

KEY_PREFIX = "ratelimit:ip:"
"""Followed by the client address; a sorted set of request times (ms)."""

REMOTE_ADDRESS = "remote_address"
"""The descriptor entry Envoy's ``remote_address`` action produces."""

FAIL_OPEN_LOG_EVERY_S = 60.0

# KEYS[1]: the address's sorted set. ARGV: limit, window in ms, hits, a
# member prefix unique to this call. Returns {admitted (1/0), remaining,
# ms until the oldest recorded request leaves the window}.
_SCRIPT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window)
local count = redis.call('ZCARD', KEYS[1])
local admitted = 0
if count + hits <= limit then
  for i = 1, hits do
    redis.call('ZADD', KEYS[1], now_ms, ARGV[4] .. ':' .. i)
  end
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + hits
  admitted = 1
end
local reset = window
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then
  reset = tonumber(oldest[2]) + window - now_ms
end
return {admitted, limit - count, reset}
"""


@dataclass(frozen=True)
class Verdict:
    """One address's count after a check."""

    admitted: bool
    remaining: int
    reset_s: float
    """Seconds until the oldest counted request leaves the window."""


class IpRateLimiter:
    """A sliding-window count per client address, kept in Redis."""

    def __init__(
        self,
        redis_client: redis.Redis,
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._script = redis_client.register_script(_SCRIPT)
        self._limit = limit
        self._window_ms = max(1, round(window_s * 1000))
        self._clock = clock
        self._failing_since: float | None = None
        self._logged_at: float | None = None

    async def hit(self, address: str, hits: int = 1) -> Verdict | None:
        """Counts ``hits`` requests from ``address``; None when Redis failed."""
        try:
            admitted, remaining, reset_ms = await self._script(
                keys=[KEY_PREFIX + address],
                args=[self._limit, self._window_ms, hits, secrets.token_hex(8)],
            )
        except RedisError as exc:
            self._fail_open(exc)
            return None
        if self._failing_since is not None:
            logger.info("api rate limit is counting again")
            self._failing_since = None
        return Verdict(
            admitted=bool(admitted),
            remaining=max(0, int(remaining)),
            reset_s=max(0, int(reset_ms)) / 1000,
        )

    def _fail_open(self, exc: RedisError) -> None:
        metrics.IP_UNCOUNTED.inc()
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        if self._logged_at is None or now - self._logged_at >= FAIL_OPEN_LOG_EVERY_S:
            self._logged_at = now
            logger.warning(
                "api rate limit not counted, requests admitted (failing for %.0fs): %s",
                now - self._failing_since,
                exc,
            )


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):
    """Envoy's ``envoy.service.ratelimit.v3.RateLimitService``, for the edge."""

    def __init__(self, limiter: IpRateLimiter, domain: str) -> None:
        self._limiter = limiter
        self._domain = domain

    async def ShouldRateLimit(
        self,
        request: rls_pb2.RateLimitRequest,
        context: grpc.aio.ServicerContext[
            rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse
        ],
    ) -> rls_pb2.RateLimitResponse:
        ok = rls_pb2.RateLimitResponse.Code.OK
        over = rls_pb2.RateLimitResponse.Code.OVER_LIMIT
        reply = rls_pb2.RateLimitResponse(overall_code=ok)
        hits = max(1, request.hits_addend)
        retry_after_s = 0.0
        for descriptor in request.descriptors:
            status = reply.statuses.add(code=ok)
            entries = [(e.key, e.value) for e in descriptor.entries]
            # Only the per-IP descriptor of this edge is counted here.
            if request.domain != self._domain or len(entries) != 1:
                continue
            [(key, address)] = entries
            if key != REMOTE_ADDRESS or not address:
                continue
            verdict = await self._limiter.hit(address, hits)
            if verdict is None:
                continue
            status.limit_remaining = verdict.remaining
            status.duration_until_reset.FromMilliseconds(
                math.ceil(verdict.reset_s * 1000)
            )
            if not verdict.admitted:
                metrics.IP_LIMITED.inc(hits)
                status.code = over
                reply.overall_code = over
                retry_after_s = max(retry_after_s, verdict.reset_s)
        if reply.overall_code == over:
            reply.response_headers_to_add.append(
                base_pb2.HeaderValue(
                    key="retry-after", value=str(max(1, math.ceil(retry_after_s)))
                )
            )
        return reply
