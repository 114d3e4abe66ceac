"""The embedded stores answer, keep their data over a restart and leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from aiobotocore.session import get_session

from devstack.infra import (
    Infra,
    InfraAddresses,
    InfraError,
    InfraSettings,
    free_port,
)


@dataclass
class Stack:
    infra: Infra
    addresses: InfraAddresses
    settings: InfraSettings


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = InfraSettings(
        data_dir=tmp_path_factory.mktemp("infra"), sqs_visibility_timeout_s=1
    )
    infra = Infra(settings)
    addresses = infra.start()
    try:
        yield Stack(infra, addresses, settings)
    finally:
        infra.stop()


@contextlib.asynccontextmanager
async def aws(addresses: InfraAddresses, service: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        service,
        region_name=addresses.aws_region,
        endpoint_url=addresses.aws_endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as client:
        yield client


def alive(proc: psutil.Process) -> bool:
    # In a container whose init does not reap, an exited orphan stays a zombie.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree(infra: Infra) -> list[psutil.Process]:
    tree = []
    for child in infra.processes:
        proc = psutil.Process(child.pid)
        tree += [proc, *proc.children(recursive=True)]
    return tree


def postgres_in(data: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        if proc.info["name"] == "postgres" and proc.info["cwd"] == str(data):
            found.append(proc)
    return [proc for proc in found if alive(proc)]


def test_addresses_as_env_and_shell_lines(stack: Stack) -> None:
    env = stack.addresses.as_env()
    assert set(env) == {
        "DATABASE_URL",
        "REDIS_URL",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "S3_BUCKET",
        "SQS_INGESTION_QUEUE_URL",
        "SQS_INGESTION_DLQ_URL",
    }
    assert env["DATABASE_URL"].startswith("postgresql://postgres@127.0.0.1:")
    assert env["DATABASE_URL"].endswith("/janna")
    assert env["AWS_REGION"] == "us-east-1"
    assert env["S3_BUCKET"] == "janna-attachments"
    parsed = dict(
        line.split("=", 1)
        for line in shlex.split(stack.addresses.shell_lines(), comments=True)
    )
    assert parsed == env
    assert len(stack.infra.processes) == 3


async def test_postgres_answers_with_pgvector(stack: Stack) -> None:
    conn = await asyncpg.connect(stack.addresses.database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "janna"
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        await conn.execute("CREATE TABLE chunks (id int PRIMARY KEY, v vector(3))")
        await conn.executemany(
            "INSERT INTO chunks VALUES ($1, $2::text::vector)",
            [(1, "[1,0,0]"), (2, "[0,1,0]"), (3, "[0.9,0.2,0]")],
        )
        rows = await conn.fetch(
            "SELECT id, v <=> $1::text::vector AS distance FROM chunks"
            " ORDER BY distance LIMIT 2",
            "[1,0,0]",
        )
        assert [row["id"] for row in rows] == [1, 3]
        assert rows[0]["distance"] == pytest.approx(0.0)
    finally:
        await conn.close()


async def test_redis_set_get(stack: Stack) -> None:
    client = aioredis.from_url(stack.addresses.redis_url)
    try:
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()


async def test_s3_put_get(stack: Stack) -> None:
    async with aws(stack.addresses, "s3") as s3:
        await s3.put_object(
            Bucket=stack.addresses.s3_bucket, Key="docs/a b.txt", Body=b"attachment"
        )
        got = await s3.get_object(Bucket=stack.addresses.s3_bucket, Key="docs/a b.txt")
        async with got["Body"] as body:
            assert await body.read() == b"attachment"


async def test_queue_redrives_to_the_dlq(stack: Stack) -> None:
    addresses = stack.addresses
    async with aws(addresses, "sqs") as sqs:
        dlq_arn = (
            await sqs.get_queue_attributes(
                QueueUrl=addresses.sqs_ingestion_dlq_url, AttributeNames=["QueueArn"]
            )
        )["Attributes"]["QueueArn"]
        attributes = (
            await sqs.get_queue_attributes(
                QueueUrl=addresses.sqs_ingestion_queue_url, AttributeNames=["All"]
            )
        )["Attributes"]
        policy = json.loads(attributes["RedrivePolicy"])
        assert policy["deadLetterTargetArn"] == dlq_arn
        assert dlq_arn.endswith(":janna-ingestion-dlq")
        assert int(policy["maxReceiveCount"]) == 3
        assert attributes["VisibilityTimeout"] == "1"


async def test_message_received_three_times_goes_to_the_dlq(stack: Stack) -> None:
    queue = stack.addresses.sqs_ingestion_queue_url
    dlq = stack.addresses.sqs_ingestion_dlq_url
    async with aws(stack.addresses, "sqs") as sqs:
        await sqs.send_message(QueueUrl=queue, MessageBody="poison")
        deadline = time.monotonic() + 30
        receives = 0
        in_dlq: list[dict[str, Any]] = []
        while not in_dlq:
            assert time.monotonic() < deadline, f"not in the DLQ after {receives}"
            # Received and never deleted: it comes back once the 1 s
            # visibility timeout runs out, until the next receive after the
            # third moves it to the DLQ.
            got = await sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)
            receives += sum(m["Body"] == "poison" for m in got.get("Messages", []))
            assert receives <= 3
            got = await sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=0)
            in_dlq = [m for m in got.get("Messages", []) if m["Body"] == "poison"]
        assert receives == 3
        await sqs.delete_message(QueueUrl=dlq, ReceiptHandle=in_dlq[0]["ReceiptHandle"])


def test_failed_start_raises_and_stops_what_it_started(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        infra = Infra(InfraSettings(data_dir=tmp_path, redis_port=port))
        started: list[psutil.Process] = []
        original_spawn = infra._spawn

        def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            proc = original_spawn(*args, **kwargs)
            started.append(psutil.Process(proc.pid))
            return proc

        infra._spawn = spawn  # type: ignore[method-assign]
        with pytest.raises(InfraError, match="valkey exited"):
            infra.start()
    assert len(started) == 3
    assert infra.processes == []
    assert not [proc for proc in started if alive(proc)]
    assert not postgres_in(tmp_path / "postgres")


async def test_stop_leaves_nothing_and_restart_keeps_data(stack: Stack) -> None:
    addresses = stack.addresses
    conn = await asyncpg.connect(addresses.database_url)
    await conn.execute("CREATE TABLE kept (note text)")
    await conn.execute("INSERT INTO kept VALUES ('survives')")
    client = aioredis.from_url(addresses.redis_url)
    await client.set("kept", "survives")
    await client.aclose()
    async with aws(addresses, "s3") as s3:
        await s3.put_object(Bucket=addresses.s3_bucket, Key="kept", Body=b"survives")
    async with aws(addresses, "sqs") as sqs:
        await sqs.send_message(
            QueueUrl=addresses.sqs_ingestion_queue_url, MessageBody="survives"
        )

    tree = process_tree(stack.infra)
    assert len(tree) > 3, "postgres has its background processes"
    # The connection still open proves fast shutdown ends busy backends too.
    stack.infra.stop()
    assert not [proc for proc in tree if alive(proc)]
    assert not postgres_in(stack.settings.data_dir.resolve() / "postgres")
    with contextlib.suppress(Exception):
        await conn.close(timeout=1)
    stack.infra.stop()  # idempotent

    # A postmaster.pid whose pid now belongs to an unrelated process.
    sleeper = subprocess.Popen(["sleep", "60"])
    pid_file = stack.settings.data_dir / "postgres" / "postmaster.pid"
    pid_file.write_text(f"{sleeper.pid}\n{pid_file.parent}\n")
    again = Infra(stack.settings)
    try:
        began = time.monotonic()
        restarted = again.start()
        assert time.monotonic() - began < 10
        conn = await asyncpg.connect(restarted.database_url)
        try:
            assert await conn.fetchval("SELECT note FROM kept") == "survives"
        finally:
            await conn.close()
        client = aioredis.from_url(restarted.redis_url)
        try:
            assert await client.get("kept") == b"survives"
        finally:
            await client.aclose()
        async with aws(restarted, "s3") as s3:
            got = await s3.get_object(Bucket=restarted.s3_bucket, Key="kept")
            async with got["Body"] as body:
                assert await body.read() == b"survives"
        async with aws(restarted, "sqs") as sqs:
            got = await sqs.receive_message(
                QueueUrl=restarted.sqs_ingestion_queue_url, WaitTimeSeconds=2
            )
            assert [m["Body"] for m in got["Messages"]] == ["survives"]
            await sqs.delete_message(
                QueueUrl=restarted.sqs_ingestion_queue_url,
                ReceiptHandle=got["Messages"][0]["ReceiptHandle"],
            )
            attributes = (
                await sqs.get_queue_attributes(
                    QueueUrl=restarted.sqs_ingestion_queue_url,
                    AttributeNames=["RedrivePolicy"],
                )
            )["Attributes"]
            assert json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
    finally:
        again.stop()
        sleeper.kill()
        sleeper.wait()


async def test_start_after_the_postmaster_was_killed(stack: Stack) -> None:
    stack.infra.stop()
    data = stack.settings.data_dir.resolve() / "postgres"
    first = Infra(stack.settings)
    try:
        addresses = first.start()
        conn = await asyncpg.connect(addresses.database_url)
        await conn.execute("CREATE TABLE committed (n int)")
        await conn.execute("INSERT INTO committed VALUES (42)")
        postmaster = next(p for p in first.processes if p.args[0].endswith("/postgres"))
        os.kill(postmaster.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await conn.close(timeout=1)
    finally:
        first.stop()
    assert not postgres_in(data)
    assert (data / "postmaster.pid").exists(), "left behind by the killed postmaster"

    second = Infra(stack.settings)
    try:
        addresses = second.start()
        conn = await asyncpg.connect(addresses.database_url)
        try:
            assert await conn.fetchval("SELECT n FROM committed") == 42
        finally:
            await conn.close()
    finally:
        second.stop()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
