"""Start-up of the chat service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc
from services.runtime import db, kv
from services.runtime.config import DatabaseConfig, Env, RedisConfig, ServerConfig
from services.runtime.pending import pending
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

CHAT = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
RATE_LIMIT_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["RateLimitAdmin"]
METRICS_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["MetricsAdmin"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("chat", env)
    database = DatabaseConfig.from_env(env)
    redis_config = RedisConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        redis = kv.connect(redis_config)
        resources.push_async_callback(redis.aclose)
        return [
            Servicer(
                CHAT,
                pending(chat_pb2_grpc.ChatServiceServicer, CHAT),
                chat_pb2_grpc.add_ChatServiceServicer_to_server,
            ),
            Servicer(
                RATE_LIMIT_ADMIN,
                pending(admin_pb2_grpc.RateLimitAdminServicer, RATE_LIMIT_ADMIN),
                admin_pb2_grpc.add_RateLimitAdminServicer_to_server,
            ),
            Servicer(
                METRICS_ADMIN,
                pending(admin_pb2_grpc.MetricsAdminServicer, METRICS_ADMIN),
                admin_pb2_grpc.add_MetricsAdminServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("chat", build)
