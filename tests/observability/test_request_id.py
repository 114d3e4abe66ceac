"""One request id per request: in the response, in every error body, in every log line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2

from devstack.stack import ROOT, Stack
from services.proto.janna.v1 import mesh_pb2, mesh_pb2_grpc
from services.runtime import channels, logs
from services.runtime.server import AccessLog
from tests.documents.helpers import upload_direct, wait_status
from tests.observability.helpers import bearer, new_user


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30.0) as http:
        yield http


def lines_with(logs_dir: Path, text: str) -> dict[str, list[str]]:
    """Each log file's lines that contain ``text``."""
    found: dict[str, list[str]] = {}
    for path in sorted(logs_dir.glob("*.log")):
        hits = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if text in line
        ]
        if hits:
            found[path.stem] = hits
    return found


async def wait_for_lines(
    logs_dir: Path, text: str, files: set[str], timeout_s: float = 20.0
) -> dict[str, list[str]]:
    """Envoy flushes its access log every few seconds, the services at once."""
    deadline = time.monotonic() + timeout_s
    found = lines_with(logs_dir, text)
    while not files <= set(found) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        found = lines_with(logs_dir, text)
    return found


async def test_a_turn_with_retrieval_is_one_id_in_every_log_it_touched(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    # A document of the user's, so that the search embeds the question.
    user = new_user()
    uploaded = await upload_direct(
        client, user, "notes.txt", "text/plain", b"The amber gate opens at noon."
    )
    assert uploaded.status_code == 200, uploaded.text
    ready = await wait_status(client, user, uploaded.json()["id"])
    assert ready["status"] == "ready", ready
    async with client.stream(
        "POST",
        "/api/chat/stream",
        json={"message": "what do my documents say?", "ragEnabled": True},
        headers=bearer(user),
    ) as reply:
        assert reply.status_code == 200
        body = [line async for line in reply.aiter_lines()]
    request_id = reply.headers["x-request-id"]
    assert any('"retrieved"' in line for line in body)

    found = await wait_for_lines(
        stack.settings.logs, request_id, {"envoy", "chat", "rag", "gateway"}
    )

    assert {"envoy", "chat", "rag", "gateway"} <= set(found), found
    assert any("/janna.v1.ChatService/StreamChat OK" in line for line in found["chat"])
    assert any("/janna.v1.RetrievalService/Search" in line for line in found["rag"])
    # Both hops to the gateway: the answer from chat, the query's embedding
    # from rag, which forwards the id without naming it.
    assert any("/janna.v1.ModelGateway/Generate" in line for line in found["gateway"])
    assert any("/janna.v1.ModelGateway/Embed" in line for line in found["gateway"])


async def test_error_bodies_carry_the_request_id(client: httpx.AsyncClient) -> None:
    user = bearer(new_user())
    empty_query = await client.post(
        "/api/rag/search", json={"query": "", "limit": 5}, headers=user
    )
    missing = await client.get("/api/conversations/not-a-uuid", headers=user)

    for reply in (empty_query, missing):
        assert reply.status_code in (400, 404)
        request_id = reply.headers["x-request-id"]
        [info] = reply.json()["details"]
        assert info["metadata"] == {"requestId": request_id}


async def test_an_unexpected_exception_is_an_error_with_the_id_not_the_text() -> None:
    class Broken(mesh_pb2_grpc.MeshHealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            raise RuntimeError("secret internals")

    server = grpc.aio.server(interceptors=[AccessLog("test")])
    mesh_pb2_grpc.add_MeshHealthServicer_to_server(Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await mesh_pb2_grpc.MeshHealthStub(channel).Check(
                    mesh_pb2.MeshHealthRequest(),
                    metadata=(("x-request-id", "rid-unexpected-1"),),
                    timeout=5,
                )
    finally:
        await server.stop(None)

    error = failed.value
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == "internal error"
    trailers = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == (
        "INTERNAL",
        {"requestId": "rid-unexpected-1"},
    )


async def test_calls_made_while_serving_a_request_carry_its_id() -> None:
    seen: list[dict[str, Any]] = []

    class Recorder(mesh_pb2_grpc.MeshHealthServicer):
        async def Check(self, request: Any, context: Any) -> Any:
            seen.append(dict(context.invocation_metadata()))
            return mesh_pb2.MeshHealthReport(status="ok")

    server = grpc.aio.server()
    mesh_pb2_grpc.add_MeshHealthServicer_to_server(Recorder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = channels.connect(f"127.0.0.1:{port}")
    try:
        stub = mesh_pb2_grpc.MeshHealthStub(channel)
        await stub.Check(mesh_pb2.MeshHealthRequest(), timeout=5)
        token = logs.REQUEST_ID.set("rid-forwarded-1")
        try:
            await stub.Check(mesh_pb2.MeshHealthRequest(), timeout=5)
            # A caller that names an id itself keeps it.
            await stub.Check(
                mesh_pb2.MeshHealthRequest(),
                metadata=(("x-request-id", "rid-explicit"),),
                timeout=5,
            )
        finally:
            logs.REQUEST_ID.reset(token)
    finally:
        await channel.close()
        await server.stop(None)

    assert "x-request-id" not in seen[0]
    assert seen[1]["x-request-id"] == "rid-forwarded-1"
    assert seen[2]["x-request-id"] == "rid-explicit"


_LOG_PROGRAM = """
import logging, sys
from services.runtime import logs
from services.runtime.config import Env
logs.configure("probe", Env())
logging.getLogger("quiet.module").info("not shown")
logs.REQUEST_ID.set("rid-log-1")
logging.getLogger("probe.module").info("answered %s", "fine", extra={"ms": 3})
"""


def _run_logging(env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _LOG_PROGRAM],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr.splitlines()


def test_logs_are_json_in_production_and_short_lines_otherwise() -> None:
    base = {"PATH": "/usr/bin:/bin", "JANNA_LOG_LEVELS": "quiet.module=WARNING"}

    [json_line] = _run_logging({**base, "JANNA_LOG_FORMAT": "json"})
    [text_line] = _run_logging(base)

    entry = json.loads(json_line)
    assert entry["level"] == "info"
    assert entry["service"] == "probe"
    assert entry["logger"] == "probe.module"
    assert entry["msg"] == "answered fine"
    assert entry["request_id"] == "rid-log-1"
    assert entry["ms"] == 3
    assert text_line.endswith("I probe probe.module: answered fine rid=rid-log-1")


def test_a_bad_log_level_stops_the_service_with_one_line(
    service_env: dict[str, str],
) -> None:
    env = {**service_env, "JANNA_LOG_LEVEL": "LOUD", "JANNA_RAG_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "services.rag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert "JANNA_LOG_LEVEL: 'LOUD' is not a log level" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
