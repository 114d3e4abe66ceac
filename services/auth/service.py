"""Start-up of the auth service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from services.runtime import db, kv
from services.runtime.config import DatabaseConfig, Env, RedisConfig, ServerConfig
from services.runtime.pending import pending
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
USER_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["UserAdmin"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("auth", env)
    database = DatabaseConfig.from_env(env)
    redis_config = RedisConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        redis = kv.connect(redis_config)
        resources.push_async_callback(redis.aclose)
        return [
            Servicer(
                AUTH,
                pending(auth_pb2_grpc.AuthServiceServicer, AUTH),
                auth_pb2_grpc.add_AuthServiceServicer_to_server,
            ),
            Servicer(
                USER_ADMIN,
                pending(admin_pb2_grpc.UserAdminServicer, USER_ADMIN),
                admin_pb2_grpc.add_UserAdminServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("auth", build)
