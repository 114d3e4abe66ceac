"""What the edge tests cannot show: several auth replicas, and Redis going away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from envoy.service.ratelimit.v3 import rls_pb2

from devstack.infra import free_port
from devstack.stack import Stack
from services.auth.ratelimit import IpRateLimiter, RateLimitService
from services.auth.users import UserStates, UserStore
from services.runtime import kv
from services.runtime.config import RedisConfig
from services.runtime.identity import Caller


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield created
    await created.close()


async def _replica(stack: Stack, pool: asyncpg.Pool) -> UserStates:
    assert stack.addresses is not None
    states = UserStates(
        UserStore(pool), kv.connect(RedisConfig(stack.addresses.redis_url)), 60.0
    )
    states.start()
    for _ in range(200):
        if states.live:
            break
        await asyncio.sleep(0.05)
    assert states.live
    return states


async def test_a_change_on_one_replica_reaches_the_others_within_a_second(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    a, b = await _replica(stack, pool), await _replica(stack, pool)
    try:
        bob = Caller(user_id=f"u-{uuid.uuid4().hex[:10]}", email="", groups=())
        assert await a.disabled(bob) is False
        # The flag is cached: a change behind the service's back is not seen
        # for the whole TTL (60 s here)...
        await pool.execute(
            "UPDATE users SET disabled = true WHERE id = $1", bob.user_id
        )
        assert await a.disabled(bob) is False
        await pool.execute(
            "UPDATE users SET disabled = false WHERE id = $1", bob.user_id
        )

        # ...while one made through any replica reaches every other at once.
        await b.set_disabled(bob.user_id, True)
        started = time.monotonic()
        seen = False
        for _ in range(100):
            seen = await a.disabled(bob)
            if seen:
                break
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
        await b.set_disabled(bob.user_id, False)

        assert seen and took < 1.0
        assert await b.disabled(bob) is False
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_admits_and_logs_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gone = kv.connect(RedisConfig(f"redis://127.0.0.1:{free_port()}/0"))
    limiter = IpRateLimiter(gone, limit=1, window_s=10)
    service = RateLimitService(limiter, "janna")
    request = rls_pb2.RateLimitRequest(domain="janna")
    request.descriptors.add().entries.add(key="remote_address", value="192.0.2.7")
    try:
        with caplog.at_level(logging.WARNING, logger="services.auth.ratelimit"):
            replies = [await service.ShouldRateLimit(request, None) for _ in range(5)]
    finally:
        await gone.aclose()

    ok = rls_pb2.RateLimitResponse.Code.OK
    assert [r.overall_code for r in replies] == [ok] * 5
    warnings = [r for r in caplog.records if "not counted" in r.getMessage()]
    assert len(warnings) == 1
