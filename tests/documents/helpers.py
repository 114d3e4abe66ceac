"""Helpers of the documents tests: calls through the edge as a user makes them,
waiting for a status, a gateway of the tests' own and a worker process.

Calls through Envoy carry a dev token and the same caller as ``x-user-*``
headers: the token once the auth service vouches for callers, the headers
until then (Envoy forwards request headers as gRPC metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from devstack.stack import ROOT
from services.ingest.aws import Aws
from services.ingest.config import AwsConfig
from services.proto.janna.v1 import gateway_pb2, gateway_pb2_grpc

DIMENSION = 384
READY_TIMEOUT_S = 120.0


def headers(user: str, *groups: str) -> dict[str, str]:
    """What a client sends: a dev token, and the caller as the edge will name it."""
    found = {
        "authorization": f"Bearer dev:{user}:{user}@dev.local",
        "x-user-id": user,
        "x-user-email": f"{user}@dev.local",
    }
    if groups:
        found["x-user-groups"] = ",".join(groups)
    return found


def metadata(user: str, *groups: str) -> tuple[tuple[str, str], ...]:
    """The caller as gRPC metadata, for calls straight to a service."""
    return (
        ("x-user-id", user),
        ("x-user-email", f"{user}@dev.local"),
        ("x-user-groups", ",".join(groups)),
    )


@contextlib.asynccontextmanager
async def aws_clients(env: dict[str, str], queue: str, dlq: str) -> AsyncIterator[Aws]:
    session = get_session()
    session.set_credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    args: dict[str, Any] = {
        "region_name": env["AWS_REGION"],
        "endpoint_url": env["AWS_ENDPOINT_URL"],
        "config": AioConfig(s3={"addressing_style": "path"}, read_timeout=60),
    }
    config = AwsConfig(
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region=env["AWS_REGION"],
        bucket=env["S3_BUCKET"],
        queue_url=queue,
        dlq_url=dlq,
    )
    async with (
        session.create_client("s3", **args) as s3,
        session.create_client("sqs", **args) as sqs,
    ):
        yield Aws(config, s3, sqs)


async def wait_for(
    check: Callable[[], Awaitable[Any]], within_s: float = READY_TIMEOUT_S
) -> Any:
    """Polls ``check`` until it returns something truthy."""
    deadline = time.monotonic() + within_s
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {within_s:.0f}s waiting")
        await asyncio.sleep(0.2)


async def wait_status(
    edge: httpx.AsyncClient,
    user: str,
    attachment_id: str,
    statuses: tuple[str, ...] = ("ready", "error"),
    within_s: float = READY_TIMEOUT_S,
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        reply = await edge.get(
            f"/api/attachments/{attachment_id}", headers=headers(user)
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body if body["status"] in statuses else None

    found: dict[str, Any] = await wait_for(check, within_s)
    return found


async def upload_direct(
    edge: httpx.AsyncClient, user: str, filename: str, content_type: str, data: bytes
) -> httpx.Response:
    return await edge.post(
        "/api/attachments/upload",
        params={"filename": filename},
        content=data,
        headers={**headers(user), "content-type": content_type},
    )


async def upload_presigned(
    edge: httpx.AsyncClient, user: str, filename: str, content_type: str, data: bytes
) -> dict[str, Any]:
    """Create, PUT to the pre-signed URL, complete; returns the completed attachment."""
    created = await edge.post(
        "/api/attachments",
        json={
            "filename": filename,
            "contentType": content_type,
            "sizeBytes": len(data),
        },
        headers=headers(user),
    )
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["attachment"]["status"] == "uploading"
    async with httpx.AsyncClient(timeout=30.0) as plain:
        put = await plain.put(
            body["uploadUrl"], content=data, headers=body["uploadHeaders"]
        )
    assert put.status_code == 200, put.text
    done = await edge.post(
        f"/api/attachments/{body['attachment']['id']}/complete", headers=headers(user)
    )
    assert done.status_code == 200, done.text
    completed: dict[str, Any] = done.json()
    return completed


async def search(
    edge: httpx.AsyncClient, user: str, query: str, **extra: Any
) -> list[dict[str, Any]]:
    reply = await edge.post(
        "/api/rag/search", json={"query": query, **extra}, headers=headers(user)
    )
    assert reply.status_code == 200, reply.text
    chunks: list[dict[str, Any]] = reply.json().get("chunks", [])
    return chunks


# --- a gateway of the tests' own, for the worker's failure paths -------------


def fake_embedding(text: str) -> list[float]:
    """Words hashed into 384 buckets, normalised: equal words, near vectors."""
    vector = [0.0] * DIMENSION
    for word in text.lower().split():
        digest = hashlib.sha256(word.strip(".,;:!?").encode()).digest()
        vector[int.from_bytes(digest[:4], "big") % DIMENSION] += 1.0
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


@dataclass
class FakeGateway(gateway_pb2_grpc.ModelGatewayServicer):
    """Embed only: deterministic vectors, with failures and stalls on request."""

    failures: list[grpc.StatusCode] = field(default_factory=list)
    """Codes the next calls fail with, one per call."""
    always_fail: grpc.StatusCode | None = None
    hold: asyncio.Event | None = None
    """While set to an unset event, calls wait for it."""
    calls: int = 0
    served: int = 0
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def Embed(
        self,
        request: gateway_pb2.EmbedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gateway_pb2.EmbedResponse:
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            await context.abort(self.failures.pop(0), "fake gateway says no")
        if self.always_fail is not None:
            await context.abort(self.always_fail, "fake gateway says no")
        self.served += 1
        return gateway_pb2.EmbedResponse(
            embeddings=[
                gateway_pb2.Embedding(values=fake_embedding(t)) for t in request.texts
            ],
            dimension=DIMENSION,
            model="fake",
        )


@dataclass
class Queues:
    """A queue and its DLQ (3 receives) of one test, on the stack's SQS."""

    aws: Aws
    queue_url: str
    dlq_url: str


class WorkerProcess:
    """``python -m services.ingest.worker`` on a test's queues and gateway."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.ingest.worker"],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


async def stage(
    db: asyncpg.Connection,
    queues: Queues,
    user: str,
    filename: str,
    content_type: str,
    data: bytes,
) -> uuid.UUID:
    """An attachment as CompleteAttachment leaves it: object in the bucket, row
    processing, one message on the (test's) queue."""
    attachment_id = uuid.uuid4()
    key = f"users/{user}/{attachment_id}/{filename}"
    await queues.aws.put(key, data, content_type)
    await db.execute(
        """INSERT INTO attachments (id, user_id, filename, content_type, size_bytes,
                                    s3_key, status)
           VALUES ($1, $2, $3, $4, $5, $6, 'processing')""",
        attachment_id,
        user,
        filename,
        content_type,
        len(data),
        key,
    )
    await queues.aws.send(
        queues.queue_url,
        json.dumps({"attachmentId": str(attachment_id), "userId": user}),
    )
    return attachment_id


async def attachment_row(
    db: asyncpg.Connection, attachment_id: uuid.UUID
) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM attachments WHERE id = $1", attachment_id)
    assert row is not None
    return row


@contextlib.asynccontextmanager
async def private_queues(env: dict[str, str], prefix: str) -> AsyncIterator[Queues]:
    """A queue and its DLQ (redrive after 3 receives) for one test alone."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    async with aws_clients(env, "", "") as bare:
        sqs = bare._sqs
        dlq = (await sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
        arn = (
            await sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])
        )["Attributes"]["QueueArn"]
        queue = (
            await sqs.create_queue(
                QueueName=name,
                Attributes={
                    "VisibilityTimeout": "5",
                    "RedrivePolicy": json.dumps(
                        {"deadLetterTargetArn": arn, "maxReceiveCount": "3"}
                    ),
                },
            )
        )["QueueUrl"]
    async with aws_clients(env, queue, dlq) as found:
        yield Queues(found, queue, dlq)
        for url in (queue, dlq):
            await found._sqs.delete_queue(QueueUrl=url)
