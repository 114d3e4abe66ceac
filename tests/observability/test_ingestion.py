"""Ingestion's figures: a file ingested, a job dead-lettered, and the upload's request id."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest_asyncio

from devstack.infra import free_port as _free_port
from devstack.stack import Stack
from services.proto.janna.v1 import gateway_pb2_grpc
from services.runtime.scrape import Scraped
from tests.documents.helpers import (
    FakeGateway,
    Queues,
    WorkerProcess,
    attachment_row,
    aws_clients,
    private_queues,
    stage,
    upload_direct,
    wait_for,
    wait_status,
)
from tests.documents.makers import markdown_document
from tests.observability.helpers import admin_view, metrics_of, service_metrics
from tests.observability.test_request_id import wait_for_lines


@pytest_asyncio.fixture
async def edge(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30.0) as client:
        yield client


async def worker_metrics(stack: Stack) -> Scraped:
    return await metrics_of(stack.worker_metrics_ports[0])


async def test_an_ingested_file_moves_the_worker_and_ingest_figures(
    stack: Stack, edge: httpx.AsyncClient
) -> None:
    user = f"obs-{uuid.uuid4().hex[:8]}"
    jobs_before = await worker_metrics(stack)
    view_before = await admin_view(edge)

    uploaded = await upload_direct(
        edge,
        user,
        "notes.md",
        "text/markdown",
        markdown_document("The quarterly figures are kept in the blue binder."),
    )
    assert uploaded.status_code == 200, uploaded.text
    request_id = uploaded.headers["x-request-id"]
    attachment = await wait_status(edge, user, uploaded.json()["id"])
    assert attachment["status"] == "ready"

    jobs = await worker_metrics(stack)
    assert (
        jobs.total("janna_ingest_jobs_total", outcome="ready")
        - jobs_before.total("janna_ingest_jobs_total", outcome="ready")
        == 1
    )
    assert jobs.total("janna_ingest_pages_total") > jobs_before.total(
        "janna_ingest_pages_total"
    )
    assert jobs.total("janna_ingest_job_duration_seconds_count", outcome="ready") >= 1

    await asyncio.sleep(2.5)  # the ingest service rereads its table every 2 s
    view = await admin_view(edge)
    ready = view["ingestion"]["attachments"]["ready"]
    assert ready == view_before["ingestion"]["attachments"]["ready"] + 1
    assert view["ingestWorkers"]["jobs"]["ready"] >= 1
    assert view["ingestWorkers"]["pages"] >= 1

    # The job ran long after the upload's response, in another process, and
    # its lines and its calls to the gateway carry the upload's id.
    found = await wait_for_lines(
        stack.settings.logs, request_id, {"ingest", "ingest-worker-0", "gateway"}
    )
    assert any("ready" in line for line in found["ingest-worker-0"]), found
    assert any("/janna.v1.ModelGateway/Embed" in line for line in found["gateway"])


@pytest_asyncio.fixture
async def queues(stack: Stack) -> AsyncIterator[Queues]:
    """A queue and DLQ (3 receives) of this test alone, on the stack's SQS."""
    assert stack.addresses is not None
    async with private_queues(stack.addresses.as_env(), "obs") as queues:
        yield queues


@pytest_asyncio.fixture
async def failing_gateway() -> AsyncIterator[str]:
    servicer = FakeGateway(always_fail=grpc.StatusCode.RESOURCE_EXHAUSTED)
    server = grpc.aio.server()
    gateway_pb2_grpc.add_ModelGatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_a_dead_lettered_job_is_counted_and_the_dlq_depth_shows(
    stack: Stack,
    edge: httpx.AsyncClient,
    queues: Queues,
    failing_gateway: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    metrics_port = _free_port()
    worker = WorkerProcess(
        {
            **os.environ,
            **stack.service_env(),
            "SQS_INGESTION_QUEUE_URL": queues.queue_url,
            "SQS_INGESTION_DLQ_URL": queues.dlq_url,
            "JANNA_GATEWAY_ADDR": failing_gateway,
            "JANNA_INGEST_WORKER_METRICS_PORT": str(metrics_port),
            "JANNA_WORKER_VISIBILITY_S": "3",
            "JANNA_WORKER_RETRY_DELAY_S": "1",
            "JANNA_WORKER_POLL_WAIT_S": "1",
            "JANNA_EMBED_ATTEMPTS": "1",
            "JANNA_SHUTDOWN_GRACE_S": "2",
        },
        tmp_path / "worker.log",
    )
    db = await asyncpg.connect(database_url)
    try:
        user = f"obs-{uuid.uuid4().hex[:8]}"
        attachment_id = await stage(
            db, queues, user, "a.txt", "text/plain", b"words to embed, in vain"
        )
        worker.start()

        async def dead_lettered() -> bool:
            return (await queues.aws.depth(queues.dlq_url))[0] == 1

        await wait_for(dead_lettered, 90)
        jobs = await metrics_of(metrics_port)
        row = await attachment_row(db, attachment_id)
    finally:
        worker.stop()
        await db.close()

    assert row["status"] == "error"
    assert jobs.total("janna_ingest_jobs_total", outcome="retried") == 2
    assert jobs.total("janna_ingest_jobs_total", outcome="dead_lettered") == 1

    # The stack's own DLQ, as the admin view reads it from the ingest service.
    assert stack.addresses is not None
    env = stack.addresses.as_env()
    async with aws_clients(
        env, env["SQS_INGESTION_QUEUE_URL"], env["SQS_INGESTION_DLQ_URL"]
    ) as aws:
        before = (await admin_view(edge))["ingestion"]["dlqDepth"]
        body = json.dumps({"attachmentId": str(uuid.uuid4())})
        await aws.send(aws.config.dlq_url, body)
        try:
            await asyncio.sleep(2.5)
            during = await service_metrics(stack, "ingest")
            view = await admin_view(edge)
        finally:
            for message in await aws.receive(aws.config.dlq_url, 10, 1):
                if message.body == body:
                    await aws.delete_message(aws.config.dlq_url, message.receipt_handle)
                else:
                    await aws.extend(aws.config.dlq_url, message.receipt_handle, 0)

    assert during.total("janna_ingest_queue_depth", queue="dlq") == before + 1
    assert view["ingestion"]["dlqDepth"] == before + 1
