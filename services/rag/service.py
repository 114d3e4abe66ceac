"""Start-up of the retrieval service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.proto.janna.v1 import rag_pb2, rag_pb2_grpc
from services.rag.api import RetrievalServicer
from services.rag.config import RetrievalConfig
from services.runtime import channels, db
from services.runtime.config import DatabaseConfig, Env, ServerConfig
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

RETRIEVAL = rag_pb2.DESCRIPTOR.services_by_name["RetrievalService"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("rag", env)
    database = DatabaseConfig.from_env(env)
    retrieval = RetrievalConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        gateway = channels.connect(server.peers["gateway"])
        resources.push_async_callback(gateway.close)
        return [
            Servicer(
                RETRIEVAL,
                RetrievalServicer(pool, gateway, retrieval),
                rag_pb2_grpc.add_RetrievalServiceServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("rag", build)
