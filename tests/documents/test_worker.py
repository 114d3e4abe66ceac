"""The worker's failure table: missing file, corrupt file, a busy gateway, the DLQ,
a crash mid-job.

Missing and corrupt files go through the whole stack. The others need a
gateway that fails or stalls on request, so they run a worker process of
their own on queues of their own (with the same redrive policy), against
the stack's Postgres and S3 and the tests' fake gateway.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import httpx
import pytest_asyncio

from devstack.stack import Stack
from services.ingest.api import QueueAdminServicer, _attachment_of, peek_dead_letters
from services.ingest.aws import Aws
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc
from tests.documents import makers
from tests.documents.helpers import (
    FakeGateway,
    Queues,
    WorkerProcess,
    attachment_row,
    headers,
    metadata,
    stage,
    upload_direct,
    upload_presigned,
    wait_for,
    wait_status,
)

TEXT = makers.text_document("The saffron lighthouse schedule changes in April.")


async def queue_empty(aws: Aws, queue_url: str) -> bool:
    return await aws.depth(queue_url) == (0, 0)


async def test_corrupt_pdf_is_an_error_with_a_reason(
    edge: httpx.AsyncClient, user: str, aws: Aws, db: asyncpg.Connection
) -> None:
    reply = await upload_direct(
        edge, user, "broken.pdf", "application/pdf", b"%PDF-1.7\nnot really a PDF\n"
    )
    assert reply.status_code == 200, reply.text
    done = await wait_status(edge, user, reply.json()["id"])
    assert done["status"] == "error"
    assert "not a valid PDF" in done["error"]
    assert done["chunkCount"] == 0
    await wait_for(lambda: queue_empty(aws, aws.config.queue_url), 10)
    assert (await attachment_row(db, uuid.UUID(done["id"])))["attempts"] == 1


async def test_file_deleted_before_processing(
    stack: Stack, edge: httpx.AsyncClient, user: str, aws: Aws, db: asyncpg.Connection
) -> None:
    stack.stop_worker(0)
    try:
        attachment = await upload_presigned(edge, user, "gone.txt", "text/plain", TEXT)
        key = await db.fetchval(
            "SELECT s3_key FROM attachments WHERE id = $1", uuid.UUID(attachment["id"])
        )
        await aws.delete_object(key)
    finally:
        stack.start_worker(0)

    done = await wait_status(edge, user, attachment["id"])
    assert done["status"] == "error"
    assert done["error"] == "file missing"
    await wait_for(lambda: queue_empty(aws, aws.config.queue_url), 10)


async def test_a_busy_gateway_is_retried_inside_the_job(
    fake_gateway: tuple[FakeGateway, str],
    queues: Queues,
    worker: WorkerProcess,
    db: asyncpg.Connection,
    user: str,
) -> None:
    gateway, _ = fake_gateway
    gateway.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    attachment_id = await stage(db, queues, user, "a.txt", "text/plain", TEXT)
    worker.start()

    async def ready() -> bool:
        return bool((await attachment_row(db, attachment_id))["status"] == "ready")

    await wait_for(ready, 60)
    row = await attachment_row(db, attachment_id)
    assert row["attempts"] == 1, "succeeded within the first delivery"
    assert gateway.calls == 3 and gateway.served == 1
    assert "embed retry 1/3" in worker.text()
    await wait_for(lambda: queue_empty(queues.aws, queues.queue_url), 10)


@pytest_asyncio.fixture
async def queue_admin(
    database_url: str, queues: Queues
) -> AsyncIterator[admin_pb2_grpc.QueueAdminStub]:
    """The ingest service's QueueAdmin, serving the test's queues."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    server = grpc.aio.server()
    admin_pb2_grpc.add_QueueAdminServicer_to_server(
        QueueAdminServicer(pool, queues.aws), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield admin_pb2_grpc.QueueAdminStub(channel)
    await server.stop(None)
    await pool.close()


async def test_three_failures_dead_letter_then_redrive_processes_it(
    fake_gateway: tuple[FakeGateway, str],
    queues: Queues,
    worker: WorkerProcess,
    queue_admin: admin_pb2_grpc.QueueAdminStub,
    db: asyncpg.Connection,
    user: str,
) -> None:
    gateway, _ = fake_gateway
    gateway.always_fail = grpc.StatusCode.RESOURCE_EXHAUSTED
    attachment_id = await stage(db, queues, user, "a.txt", "text/plain", TEXT)
    worker.start()

    async def retrying() -> bool:
        row = await attachment_row(db, attachment_id)
        return bool(
            row["status"] == "processing" and row["error"].startswith("try 1 failed")
        )

    await wait_for(retrying, 60)

    async def dead_lettered() -> bool:
        return (await queues.aws.depth(queues.dlq_url))[0] == 1

    await wait_for(dead_lettered, 60)
    row = await attachment_row(db, attachment_id)
    assert row["status"] == "error"
    assert row["attempts"] == 3
    assert row["error"].startswith(
        "processing failed 3 times: the embedding service is rate limited"
    )
    assert await queues.aws.depth(queues.queue_url) == (0, 0)

    admin = metadata("admin", "admin")
    letters = await queue_admin.GetDeadLetters(
        admin_pb2.GetDeadLettersRequest(), metadata=admin
    )
    assert letters.depth == 1
    assert [m.attachment_id for m in letters.messages] == [str(attachment_id)]
    # Listing leaves them visible, ready for the redrive.
    assert (await queues.aws.depth(queues.dlq_url))[0] == 1
    try:
        await queue_admin.RedriveDeadLetters(
            admin_pb2.RedriveDeadLettersRequest(), metadata=metadata(user)
        )
        raise AssertionError("a non-admin redrove the DLQ")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED

    gateway.always_fail = None
    moved = await queue_admin.RedriveDeadLetters(
        admin_pb2.RedriveDeadLettersRequest(), metadata=admin
    )
    assert moved.moved == 1
    assert (await attachment_row(db, attachment_id))["status"] in (
        "processing",
        "ready",
    )

    async def ready() -> bool:
        return bool((await attachment_row(db, attachment_id))["status"] == "ready")

    await wait_for(ready, 60)
    assert (await attachment_row(db, attachment_id))["error"] == ""
    assert await queues.aws.depth(queues.dlq_url) == (0, 0)


async def test_a_dead_letter_of_a_job_that_died_on_its_last_try_is_an_error(
    queues: Queues, db: asyncpg.Connection, user: str, database_url: str
) -> None:
    # A worker killed on the third try leaves the attachment processing, and
    # the queue moves the message to the DLQ on its own.
    attachment_id = await stage(db, queues, user, "a.txt", "text/plain", TEXT)
    other = await stage(db, queues, user, "b.txt", "text/plain", TEXT)
    for staged in (attachment_id, other):
        body = json.dumps({"attachmentId": str(staged), "userId": user})
        await queues.aws.send(queues.dlq_url, body)
    await db.execute(
        "UPDATE attachments SET status = 'ready', error = '' WHERE id = $1", other
    )

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        letters = await peek_dead_letters(pool, queues.aws)
    finally:
        await pool.close()

    assert sorted(_attachment_of(m) for m in letters) == sorted(
        [str(attachment_id), str(other)]
    )
    row = await attachment_row(db, attachment_id)
    assert row["status"] == "error"
    assert "dead-letter queue" in row["error"]
    # A dead letter of an attachment that is fine is left alone...
    assert (await attachment_row(db, other))["status"] == "ready"
    # ...and peeking leaves every message in the DLQ for a redrive.
    assert (await queues.aws.depth(queues.dlq_url))[0] == 2


async def test_a_worker_killed_mid_job_completes_it_once_after_restart(
    fake_gateway: tuple[FakeGateway, str],
    queues: Queues,
    worker: WorkerProcess,
    db: asyncpg.Connection,
    user: str,
) -> None:
    gateway, _ = fake_gateway
    gateway.hold = asyncio.Event()
    data = makers.pdf_document("The cobalt ferry leaves at dawn.")
    attachment_id = await stage(db, queues, user, "a.pdf", "application/pdf", data)
    worker.start()

    await asyncio.wait_for(gateway.entered.wait(), 60)
    worker.kill(signal.SIGKILL)
    assert (await attachment_row(db, attachment_id))["status"] == "processing"
    assert gateway.served == 0

    gateway.hold.set()
    gateway.hold = None
    worker.start()

    async def ready() -> bool:
        return bool((await attachment_row(db, attachment_id))["status"] == "ready")

    await wait_for(ready, 60)
    row = await attachment_row(db, attachment_id)
    assert row["attempts"] == 2
    stored = await db.fetch(
        'SELECT "chunkIndex" FROM document_chunks WHERE "attachmentId" = $1',
        attachment_id,
    )
    indexes = sorted(r["chunkIndex"] for r in stored)
    assert indexes == list(range(row["chunk_count"])), "no duplicate chunks"
    await wait_for(lambda: queue_empty(queues.aws, queues.queue_url), 15)


async def test_dlq_admin_calls_through_the_edge(
    edge: httpx.AsyncClient, aws: Aws, db: asyncpg.Connection, user: str
) -> None:
    # A dead letter as SQS leaves it, for an attachment that failed.
    reply = await upload_direct(edge, user, "again.txt", "text/plain", TEXT)
    attachment_id = reply.json()["id"]
    await wait_status(edge, user, attachment_id)
    await db.execute(
        "UPDATE attachments SET status = 'error', error = 'x' WHERE id = $1",
        uuid.UUID(attachment_id),
    )
    body = json.dumps({"attachmentId": attachment_id, "userId": user})
    await aws.send(aws.config.dlq_url, body)

    refused = await edge.get("/api/admin/dlq", headers=headers(user))
    assert refused.status_code == 403, refused.text

    admin = headers("admin", "admin")
    listed = await edge.get("/api/admin/dlq", headers=admin)
    assert listed.status_code == 200, listed.text
    assert listed.json()["depth"] >= 1
    assert attachment_id in [m["attachmentId"] for m in listed.json()["messages"]]

    moved = await edge.post("/api/admin/dlq/redrive", headers=admin)
    assert moved.status_code == 200, moved.text
    assert moved.json()["moved"] >= 1
    done = await wait_status(edge, user, attachment_id, ("ready",))
    assert done["error"] == ""
    assert (await aws.depth(aws.config.dlq_url))[0] == 0
