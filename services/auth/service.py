"""Start-up of the auth service: caller API, user admin, ext_authz, the IP limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

import asyncpg
import httpx
import redis.asyncio as redis
from envoy.service.auth.v3 import (  # type: ignore[import-untyped]  # xds-protos ships no stubs
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from envoy.service.ratelimit.v3 import (  # type: ignore[import-untyped]  # as above
    rls_pb2,
    rls_pb2_grpc,
)

from services.auth import metrics
from services.auth.api import AuthService, UserAdmin
from services.auth.authz import Authorization
from services.auth.config import AuthConfig
from services.auth.ratelimit import IpRateLimiter, RateLimitService
from services.auth.tokens import Jwks, Verifier
from services.auth.users import UserStates, UserStore
from services.edge.config import RATE_LIMIT_DOMAIN
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from services.runtime import db, kv
from services.runtime import metrics as exported
from services.runtime.config import DatabaseConfig, Env, RedisConfig, ServerConfig
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
USER_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["UserAdmin"]
AUTHORIZATION = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
RATE_LIMIT = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"]


async def servicers(
    config: AuthConfig,
    pool: asyncpg.Pool,
    redis_client: redis.Redis,
    http: httpx.AsyncClient,
    resources: AsyncExitStack,
) -> list[Servicer]:
    """Every servicer of the auth service, over clients the caller owns.

    Background work (invalidation listener, first JWKS fetch) is started here
    and stopped by ``resources``.
    """
    store = UserStore(pool)
    states = UserStates(store, redis_client, config.user_cache_ttl_s)
    jwks = None
    if config.jwks_url is not None:
        jwks = Jwks(
            config.jwks_url,
            http,
            refetch_interval_s=config.jwks_refetch_interval_s,
            max_age_s=config.jwks_max_age_s,
            timeout_s=config.jwks_timeout_s,
        )
    states.start()
    resources.push_async_callback(states.aclose)
    if jwks is not None:
        warm_up = asyncio.create_task(jwks.warm(), name="jwks-warm-up")
        resources.push_async_callback(_cancel, warm_up)

    limiter = IpRateLimiter(
        redis_client, config.api_rate_limit, config.api_rate_window_s
    )
    return [
        Servicer(
            AUTH, AuthService(store), auth_pb2_grpc.add_AuthServiceServicer_to_server
        ),
        Servicer(
            USER_ADMIN,
            UserAdmin(store, states),
            admin_pb2_grpc.add_UserAdminServicer_to_server,
        ),
        Servicer(
            AUTHORIZATION,
            Authorization(Verifier(config, jwks), states),
            external_auth_pb2_grpc.add_AuthorizationServicer_to_server,
        ),
        Servicer(
            RATE_LIMIT,
            RateLimitService(limiter, RATE_LIMIT_DOMAIN),
            rls_pb2_grpc.add_RateLimitServiceServicer_to_server,
        ),
    ]


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("auth", env)
    database = DatabaseConfig.from_env(env)
    redis_config = RedisConfig.from_env(env)
    config = AuthConfig.from_env(env, server.env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        resources.callback(
            exported.register(metrics.user_counts(pool, asyncio.get_running_loop()))
        )
        redis_client = kv.connect(redis_config)
        resources.push_async_callback(redis_client.aclose)
        # No redirects: the JWKS URL is configured exactly.
        http = httpx.AsyncClient(follow_redirects=False)
        resources.push_async_callback(http.aclose)
        return await servicers(config, pool, redis_client, http, resources)

    return server, setup


def main() -> int:
    return serve_main("auth", build)
