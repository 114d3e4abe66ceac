"""Start-up of the ingest service: the attachment calls and the DLQ admin calls.

The queue worker is a separate process, ``python -m services.ingest.worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack

from services.ingest import metrics
from services.ingest.api import (
    INGEST_DESCRIPTOR,
    IngestServicer,
    QueueAdminServicer,
    sweep_dead_letters,
)
from services.ingest.aws import Aws
from services.ingest.config import AwsConfig, UploadConfig
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2_grpc
from services.runtime import db
from services.runtime import metrics as exported
from services.runtime.config import DatabaseConfig, Env, ServerConfig
from services.runtime.server import Servicer, Setup
from services.runtime.server import main as serve_main

logger = logging.getLogger(__name__)

QUEUE_ADMIN = admin_pb2.DESCRIPTOR.services_by_name["QueueAdmin"]


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build(env: Env) -> tuple[ServerConfig, Setup]:
    server = ServerConfig.from_env("ingest", env)
    database = DatabaseConfig.from_env(env)
    aws_config = AwsConfig.from_env(env)
    uploads = UploadConfig.from_env(env)

    async def setup(resources: AsyncExitStack) -> Sequence[Servicer]:
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        aws = await resources.enter_async_context(Aws.connect(aws_config))
        resources.callback(
            exported.register(
                metrics.queues_and_attachments(pool, aws, asyncio.get_running_loop())
            )
        )
        sweeper = asyncio.create_task(
            sweep_dead_letters(pool, aws, uploads.dlq_sweep_s), name="dlq-sweep"
        )
        resources.push_async_callback(_stop, sweeper)
        return [
            Servicer(
                INGEST_DESCRIPTOR,
                IngestServicer(pool, aws, uploads),
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            ),
            Servicer(
                QUEUE_ADMIN,
                QueueAdminServicer(pool, aws),
                admin_pb2_grpc.add_QueueAdminServicer_to_server,
            ),
        ]

    return server, setup


def main() -> int:
    return serve_main("ingest", build)
