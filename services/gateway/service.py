"""Start-up of the model gateway."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from services.runtime import kv
from services.runtime.config import Env, RedisConfig, ServerConfig
from services.runtime.pending import pending
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["ModelGateway"]
MODEL_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("gateway", env)
    redis_config = RedisConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        redis = kv.connect(redis_config)
        resources.push_async_callback(redis.aclose)
        return [
            Servicer(
                GATEWAY,
                pending(gateway_pb2_grpc.ModelGatewayServicer, GATEWAY),
                gateway_pb2_grpc.add_ModelGatewayServicer_to_server,
            ),
            Servicer(
                MODEL_ADMIN,
                pending(admin_pb2_grpc.ModelAdminServicer, MODEL_ADMIN),
                admin_pb2_grpc.add_ModelAdminServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("gateway", build)
