"""Fixtures of the documents tests; the helpers they use are in helpers.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
import pytest_asyncio

from devstack.stack import Stack
from services.ingest.aws import Aws
from services.proto.janna.v1 import gateway_pb2_grpc
from tests.documents.helpers import (
    FakeGateway,
    Queues,
    WorkerProcess,
    aws_clients,
    private_queues,
)


@pytest.fixture
def user() -> str:
    """A user of this test alone."""
    return f"u-{uuid.uuid4().hex[:10]}"


@pytest_asyncio.fixture
async def edge(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30.0) as client:
        yield client


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def aws(stack: Stack) -> AsyncIterator[Aws]:
    """The stack's bucket and queues, through the same client code as the worker."""
    assert stack.addresses is not None
    env = stack.addresses.as_env()
    async with aws_clients(
        env, env["SQS_INGESTION_QUEUE_URL"], env["SQS_INGESTION_DLQ_URL"]
    ) as found:
        yield found


@pytest_asyncio.fixture
async def fake_gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    servicer = FakeGateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_ModelGatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest_asyncio.fixture
async def queues(stack: Stack) -> AsyncIterator[Queues]:
    assert stack.addresses is not None
    async with private_queues(stack.addresses.as_env(), "test") as queues:
        yield queues


@pytest.fixture
def worker(
    stack: Stack,
    queues: Queues,
    fake_gateway: tuple[FakeGateway, str],
    tmp_path: Path,
) -> Iterator[WorkerProcess]:
    """A worker (not yet started) polling the test's queues, embedding through the
    test's gateway, with short visibility and retry delays."""
    env = {
        **os.environ,
        **stack.service_env(),
        "SQS_INGESTION_QUEUE_URL": queues.queue_url,
        "SQS_INGESTION_DLQ_URL": queues.dlq_url,
        "JANNA_GATEWAY_ADDR": fake_gateway[1],
        "JANNA_WORKER_VISIBILITY_S": "3",
        "JANNA_WORKER_RETRY_DELAY_S": "1",
        "JANNA_WORKER_POLL_WAIT_S": "1",
        "JANNA_EMBED_ATTEMPTS": "3",
        "JANNA_EMBED_BACKOFF_S": "0.1",
        "JANNA_SHUTDOWN_GRACE_S": "2",
    }
    process = WorkerProcess(env, tmp_path / "worker.log")
    yield process
    process.stop()
