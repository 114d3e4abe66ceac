"""Start-up of the ingest service."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
)
from services.runtime import db
from services.runtime.config import DatabaseConfig, Env, ServerConfig
from services.runtime.pending import pending
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
QUEUE_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["QueueAdmin"]


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("ingest", env)
    database = DatabaseConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        return [
            Servicer(
                INGEST,
                pending(ingest_pb2_grpc.IngestServiceServicer, INGEST),
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            ),
            Servicer(
                QUEUE_ADMIN,
                pending(admin_pb2_grpc.QueueAdminServicer, QUEUE_ADMIN),
                admin_pb2_grpc.add_QueueAdminServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("ingest", build)
