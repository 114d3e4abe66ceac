"""Start-up of the chat service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

import httpx

from services.chat.config import ChatConfig
from services.chat.metrics import TurnStats
from services.chat.overview import MetricsAdminServicer
from services.chat.ratelimit import ChatRateLimiter
from services.chat.servicer import ChatServicer, RateLimitAdminServicer
from services.chat.store import ConversationStore
from services.chat.window import TurnWindow
from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    gateway_pb2_grpc,
    rag_pb2_grpc,
)
from services.runtime import channels, db, kv
from services.runtime.config import Env, ServerConfig
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

CHAT = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
RATE_LIMIT_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["RateLimitAdmin"]
METRICS_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["MetricsAdmin"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    config = ChatConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(config.database)
        resources.push_async_callback(pool.close)
        redis = kv.connect(config.redis)
        resources.push_async_callback(redis.aclose)
        gateway = channels.connect(config.server.peers["gateway"])
        resources.push_async_callback(gateway.close)
        rag = channels.connect(config.server.peers["rag"])
        resources.push_async_callback(rag.close)

        # Only other services' metrics endpoints: no redirects, no proxies.
        http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        resources.push_async_callback(http.aclose)
        window = TurnWindow(redis)
        resources.push_async_callback(window.aclose)

        limiter = ChatRateLimiter(redis, config.rate_limit_rpm, config.rate_window_s)
        chat = ChatServicer(
            config,
            ConversationStore(pool),
            limiter,
            gateway_pb2_grpc.ModelGatewayStub(gateway),
            rag_pb2_grpc.RetrievalServiceStub(rag),
            TurnStats(window),
        )
        return [
            Servicer(CHAT, chat, chat_pb2_grpc.add_ChatServiceServicer_to_server),
            Servicer(
                RATE_LIMIT_ADMIN,
                RateLimitAdminServicer(limiter),
                admin_pb2_grpc.add_RateLimitAdminServicer_to_server,
            ),
            Servicer(
                METRICS_ADMIN,
                MetricsAdminServicer(
                    window, http, config.metrics_targets, config.scrape_timeout_s
                ),
                admin_pb2_grpc.add_MetricsAdminServicer_to_server,
            ),
        ]

    return config.server, setup


def main() -> int:
    return serve_main("chat", build)
