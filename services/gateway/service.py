"""Start-up of the model gateway: providers, router, embeddings and servicers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import redis.asyncio as redis

from services.gateway import anthropic_chat, exporter, hub, openai_chat
from services.gateway.anthropic_chat import AnthropicChat
from services.gateway.config import GatewayConfig
from services.gateway.embeddings import Embedder, LocalEmbedder, OpenAIEmbedder
from services.gateway.gemma import EmbeddedGemma
from services.gateway.health import HealthCache
from services.gateway.metrics import Metrics
from services.gateway.openai_chat import OpenAIChat
from services.gateway.provider import ChatProvider
from services.gateway.router import Router
from services.gateway.servicer import ModelAdminServicer, ModelGatewayServicer
from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from services.runtime import kv
from services.runtime import metrics as exported
from services.runtime.config import Env, RedisConfig, ServerConfig
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["ModelGateway"]
MODEL_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"]


@dataclass(frozen=True)
class Gateway:
    """The parts of a running gateway; tests reach in through it."""

    config: GatewayConfig
    metrics: Metrics
    health: HealthCache
    providers: dict[str, ChatProvider]
    embedder: Embedder
    embedded: EmbeddedGemma | None
    """The in-process model, when a route uses it."""

    def servicers(self) -> list[Servicer]:
        router = Router(self.config, self.providers, self.health, self.metrics)
        return [
            Servicer(
                GATEWAY,
                ModelGatewayServicer(
                    self.config,
                    router,
                    self.providers,
                    self.embedder,
                    self.health,
                    self.metrics,
                ),
                gateway_pb2_grpc.add_ModelGatewayServicer_to_server,
            ),
            Servicer(
                MODEL_ADMIN,
                ModelAdminServicer(self.health),
                admin_pb2_grpc.add_ModelAdminServicer_to_server,
            ),
        ]


async def open_gateway(
    config: GatewayConfig, redis_client: redis.Redis, resources: AsyncExitStack
) -> Gateway:
    """Builds every part; what needs closing is pushed onto ``resources``."""
    timeouts = {
        "connect_s": config.connect_timeout_s,
        "idle_s": config.idle_timeout_s,
    }
    providers: dict[str, ChatProvider] = {}
    if config.local is not None:
        local_api = openai_chat.client(config.local, **timeouts)
        resources.push_async_callback(local_api.close)
        providers["local"] = OpenAIChat("local", local_api, completion_tokens=False)
    openai_api = None
    if config.openai is not None:
        openai_api = openai_chat.client(config.openai, **timeouts)
        resources.push_async_callback(openai_api.close)
        providers["openai"] = OpenAIChat("openai", openai_api, completion_tokens=True)
    if config.anthropic is not None:
        anthropic_api = anthropic_chat.client(config.anthropic, **timeouts)
        resources.push_async_callback(anthropic_api.close)
        providers["anthropic"] = AnthropicChat(
            anthropic_api, default_max_tokens=config.anthropic_max_tokens
        )

    embedded = None
    if any(ref.provider == "embedded" for ref in config.models):
        embedded = EmbeddedGemma(config.embedded)
        providers["embedded"] = embedded
        warm_up = asyncio.create_task(embedded.warm_up(), name="gemma-warm-up")
        resources.push_async_callback(embedded.aclose)
        resources.push_async_callback(_cancel, warm_up)

    stats = Metrics()
    embedder: Embedder
    if config.embeddings.provider == "openai" and openai_api is not None:
        embedder = OpenAIEmbedder(openai_api, config.embeddings, stats)
    else:
        embedder = LocalEmbedder()
    resources.push_async_callback(embedder.aclose)

    return Gateway(
        config=config,
        metrics=stats,
        health=HealthCache(redis_client, config.health_ttl_s),
        providers=providers,
        embedder=embedder,
        embedded=embedded,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


def build(env: Env) -> tuple[ServerConfig, Setup]:
    hub.offline()
    server = ServerConfig.from_env("gateway", env)
    config = GatewayConfig.from_env(env, server.data_dir)
    redis_config = RedisConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        redis_client = kv.connect(redis_config)
        resources.push_async_callback(redis_client.aclose)
        gateway = await open_gateway(config, redis_client, resources)
        resources.callback(
            exported.register(exporter.collector(gateway, asyncio.get_running_loop()))
        )
        return gateway.servicers()

    return server, setup


def main() -> int:
    return serve_main("gateway", build)
