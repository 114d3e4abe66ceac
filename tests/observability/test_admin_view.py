"""``GET /api/admin/metrics``: one view of the whole mesh, and what it shows when a part is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format

from devstack.stack import Stack
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc
from tests.observability.helpers import admin_view, bearer, new_user

SECTIONS = ("users", "chat", "gateway", "ingestion", "retrieval")


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30.0) as http:
        yield http


async def test_a_failed_turn_counts_as_an_error_in_both_windows(
    client: httpx.AsyncClient,
) -> None:
    # The windows are whole minutes: a minute that slides out between the two
    # readings would change the sums, so such a pair is measured again.
    for _ in range(3):
        minute = int(time.time() // 60)
        before = (await admin_view(client))["chat"]
        # The fake model cuts this answer after three tokens.
        reply = await client.post(
            "/api/chat/stream",
            json={"message": "please midstream-fail now"},
            headers=bearer(new_user()),
        )
        assert reply.status_code == 200
        assert '"type":"error"' in reply.text
        after = (await admin_view(client))["chat"]
        if int(time.time() // 60) == minute:
            break
    for window in ("last5Minutes", "lastHour"):
        assert after[window]["errors"] == before[window]["errors"] + 1, window
        assert after[window]["turns"] == before[window]["turns"] + 1, window


async def test_the_view_gathers_every_section(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    user = new_user()
    assert (await client.get("/api/me", headers=bearer(user))).status_code == 200
    reply = await client.post(
        "/api/chat/stream", json={"message": "for the view"}, headers=bearer(user)
    )
    assert reply.status_code == 200
    # A search of its own: the turn's may have given up while the embedding
    # model was still loading, and only answered searches are timed.
    deadline = time.monotonic() + 60
    searched = await client.post(
        "/api/rag/search", json={"query": "anything"}, headers=bearer(user)
    )
    while searched.status_code != 200 and time.monotonic() < deadline:
        await asyncio.sleep(1)
        searched = await client.post(
            "/api/rag/search", json={"query": "anything"}, headers=bearer(user)
        )
    assert searched.status_code == 200, searched.text
    await asyncio.sleep(0.5)

    view = await admin_view(client)

    for section in SECTIONS:
        assert view[section]["available"] is True, (section, view[section])
    users = view["users"]
    assert users["total"] >= users["activeLastDay"] >= 1
    assert users["disabled"] >= 0

    recent = view["chat"]["last5Minutes"]
    assert recent["turns"] >= 1
    assert recent["ttftP50Ms"] > 0
    assert recent["ttftP95Ms"] >= recent["ttftP50Ms"]
    assert view["chat"]["lastHour"]["turns"] >= recent["turns"]

    models = {(m["provider"], m["model"]): m for m in view["gateway"]["models"]}
    chat_model = models["openai", "gpt-4o-mini"]
    assert chat_model["routes"] == ["chat"]
    assert chat_model["health"] == "healthy"
    assert chat_model["requests"] >= 1
    assert chat_model["tokensIn"] >= 42
    assert chat_model["tokensOut"] >= 6
    assert {"errors", "errorsByKind", "fallbacks"} <= set(chat_model)

    ingestion = view["ingestion"]
    assert {"queueDepth", "dlqDepth", "attachments"} <= set(ingestion)
    retrieval = view["retrieval"]
    assert retrieval["searches"] >= 1
    assert retrieval["p95Ms"] >= retrieval["p50Ms"] > 0


async def test_a_stopped_service_shows_as_unavailable(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    stack.stop_service("rag")
    try:
        view = await admin_view(client)
    finally:
        stack.start_service("rag")
        stack.wait_healthy(60)

    assert view["retrieval"] == {"available": False}
    for section in ("users", "chat", "gateway", "ingestion"):
        assert view[section]["available"] is True, section
    assert (await admin_view(client))["retrieval"]["available"] is True


async def test_without_auth_the_users_are_unavailable_and_the_rest_is_there(
    stack: Stack,
) -> None:
    # With auth down the edge admits nobody, so the chat service is asked
    # directly, carrying the caller the way the edge would.
    stack.stop_service("auth")
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{stack.ports['chat']}"
        ) as channel:
            reply = await admin_pb2_grpc.MetricsAdminStub(channel).GetMetrics(
                admin_pb2.GetMetricsRequest(),
                metadata=(("x-user-id", "admin"), ("x-user-groups", "admin")),
                timeout=10,
            )
    finally:
        stack.start_service("auth")
        stack.wait_healthy(60)

    view = json_format.MessageToDict(reply)
    assert view["users"] == {"available": False}
    assert view["gateway"]["available"] is True
    assert view["chat"]["available"] is True
    # Back once Envoy's own health check sees it (every 2 s), which the
    # tests after this one rely on.
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=10.0) as client:
        deadline = time.monotonic() + 15
        again = await client.get("/api/me", headers=bearer(new_user()))
        while again.status_code == 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            again = await client.get("/api/me", headers=bearer(new_user()))
    assert again.status_code == 200, again.text


async def test_the_view_is_admin_only_also_to_a_direct_call(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['chat']}") as channel:
        stub = admin_pb2_grpc.MetricsAdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetMetrics(
                admin_pb2.GetMetricsRequest(),
                metadata=(("x-user-id", new_user()),),
                timeout=10,
            )

    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
