"""Every service's Prometheus endpoint, and its figures moving when what they count happens."""

from __future__ import annotations

import asyncio
import os
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
import redis.asyncio as redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from devstack.infra import free_port as _free_port
from devstack.stack import ROOT, Stack
from services.chat.window import KEY_PREFIX
from services.edge.config import RATE_LIMIT_DOMAIN
from services.proto.janna.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.config import SERVICE_NAMES
from tests.fakes.openai_server import FakeOpenAI
from tests.observability.helpers import (
    ADMIN,
    bearer,
    metrics_of,
    new_user,
    service_metrics,
)

SERVICE_FAMILIES = {
    "auth": (
        "janna_auth_allowed_total",
        "janna_auth_denied_total",
        "janna_auth_ip_rate_limited_total",
        "janna_auth_users",
    ),
    "gateway": ("janna_gateway_model_info", "janna_gateway_model_health"),
    "chat": (
        "janna_chat_turns_total",
        "janna_chat_rate_limited_total",
        "janna_chat_time_to_first_token_seconds",
    ),
    "rag": ("janna_rag_search_duration_seconds", "janna_rag_search_results"),
    "ingest": (
        "janna_ingest_queue_depth",
        "janna_ingest_queue_in_flight",
        "janna_ingest_attachments",
    ),
}


@pytest_asyncio.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30.0) as http:
        yield http


@pytest_asyncio.fixture
async def kv(stack: Stack) -> AsyncIterator[Any]:
    assert stack.addresses is not None
    client = redis.Redis.from_url(stack.addresses.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def window_totals(kv: Any) -> dict[str, int]:
    """Every field of every retained per-minute chat hash, added up."""
    totals: dict[str, int] = {}
    async for key in kv.scan_iter(match=f"{KEY_PREFIX}*"):
        for field, value in (await kv.hgetall(key)).items():
            totals[field] = totals.get(field, 0) + int(value)
    return totals


async def chat_turn(client: httpx.AsyncClient, user: str, message: str) -> list[str]:
    lines: list[str] = []
    async with client.stream(
        "POST", "/api/chat/stream", json={"message": message}, headers=bearer(user)
    ) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("name", SERVICE_NAMES)
async def test_every_service_serves_process_rpc_and_its_own_metrics(
    stack: Stack, name: str
) -> None:
    async with httpx.AsyncClient(timeout=10.0) as http:
        reply = await http.get(f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics")

    assert reply.status_code == 200
    text = reply.text
    for family in (
        "process_resident_memory_bytes",
        "janna_rpc_requests_total",
        "janna_rpc_duration_seconds",
        *SERVICE_FAMILIES[name],
    ):
        assert f"# TYPE {family} " in text, family


async def test_a_search_moves_the_retrieval_figures(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    before = await service_metrics(stack, "rag")
    reply = await client.post(
        "/api/rag/search", json={"query": "anything at all"}, headers=bearer(new_user())
    )
    assert reply.status_code == 200, reply.text
    after = await service_metrics(stack, "rag")
    for name in (
        "janna_rag_search_duration_seconds_count",
        "janna_rag_search_results_count",
    ):
        assert after.total(name) == before.total(name) + 1, name
    assert after.total("janna_rag_search_results_sum") == before.total(
        "janna_rag_search_results_sum"
    )


async def test_a_turn_moves_the_chat_and_gateway_figures(
    stack: Stack, client: httpx.AsyncClient, kv: Any
) -> None:
    chat_before = await service_metrics(stack, "chat")
    gateway_before = await service_metrics(stack, "gateway")
    window_before = await window_totals(kv)

    await chat_turn(client, new_user(), "count this turn")
    await asyncio.sleep(0.5)  # the window is written in the background

    chat = await service_metrics(stack, "chat")
    gateway = await service_metrics(stack, "gateway")
    window = await window_totals(kv)
    openai = {"provider": "openai", "model": "gpt-4o-mini"}

    def moved(after: Any, before: Any, name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert moved(chat, chat_before, "janna_chat_turns_total", outcome="complete") == 1
    assert moved(chat, chat_before, "janna_chat_time_to_first_token_seconds_count") == 1
    assert (
        moved(
            gateway,
            gateway_before,
            "janna_gateway_requests_total",
            outcome="ok",
            **openai,
        )
        == 1
    )
    assert (
        moved(
            gateway,
            gateway_before,
            "janna_gateway_tokens_total",
            direction="in",
            **openai,
        )
        == 42
    )
    assert (
        moved(
            gateway,
            gateway_before,
            "janna_gateway_tokens_total",
            direction="out",
            **openai,
        )
        == 6
    )
    # The shared window counts it too, where every replica's turns add up.
    assert window.get("turns", 0) - window_before.get("turns", 0) == 1
    ttft_before = sum(v for k, v in window_before.items() if k[5:].isdigit())
    ttft_after = sum(v for k, v in window.items() if k[5:].isdigit())
    assert ttft_after - ttft_before == 1


async def test_a_midstream_failure_is_an_error_turn(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    before = await service_metrics(stack, "chat")

    lines = await chat_turn(client, new_user(), "please midstream-fail now")

    assert '"type":"error"' in lines[-1].replace(" ", "")
    after = await service_metrics(stack, "chat")
    assert (
        after.total("janna_chat_turns_total", outcome="error")
        - before.total("janna_chat_turns_total", outcome="error")
        == 1
    )


async def test_a_refused_turn_is_counted(
    stack: Stack, client: httpx.AsyncClient, kv: Any
) -> None:
    user = new_user()
    await kv.zadd(f"rl:{user}:chat", {f"m{i}": time.time() * 1000 for i in range(30)})
    before = await service_metrics(stack, "chat")
    window_before = await window_totals(kv)

    refused = await client.post(
        "/api/chat/stream", json={"message": "hi"}, headers=bearer(user)
    )
    await asyncio.sleep(0.5)

    assert refused.status_code == 429
    after = await service_metrics(stack, "chat")
    name = "janna_chat_rate_limited_total"
    assert (
        after.total(name, reason="RATE_LIMITED")
        - before.total(name, reason="RATE_LIMITED")
        == 1
    )
    window = await window_totals(kv)
    assert window.get("rate_limited", 0) - window_before.get("rate_limited", 0) == 1


async def test_auth_counts_its_verdicts_by_reason(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    before = await service_metrics(stack, "auth")

    assert (await client.get("/api/me", headers=bearer(new_user()))).status_code == 200
    no_token = await client.get("/api/me")
    not_admin = await client.get("/api/admin/users", headers=bearer(new_user()))

    assert (no_token.status_code, not_admin.status_code) == (401, 403)
    after = await service_metrics(stack, "auth")

    def moved(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    assert moved("janna_auth_allowed_total") >= 1
    assert moved("janna_auth_denied_total", reason="UNAUTHENTICATED") == 1
    assert moved("janna_auth_denied_total", reason="ADMIN_REQUIRED") == 1


async def test_per_ip_limit_hits_are_counted(stack: Stack) -> None:
    # An address of a documentation range: no real client's count is touched.
    address = "198.51.100.23"
    before = await service_metrics(stack, "auth")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['auth']}") as channel:
        limit = rls_pb2_grpc.RateLimitServiceStub(channel)
        descriptor = ratelimit_pb2.RateLimitDescriptor(
            entries=[
                ratelimit_pb2.RateLimitDescriptor.Entry(
                    key="remote_address", value=address
                )
            ]
        )
        replies = [
            await limit.ShouldRateLimit(
                rls_pb2.RateLimitRequest(
                    domain=RATE_LIMIT_DOMAIN, descriptors=[descriptor], hits_addend=hits
                ),
                timeout=5,
            )
            for hits in (200, 1, 1)
        ]

    over = rls_pb2.RateLimitResponse.Code.OVER_LIMIT
    assert [r.overall_code == over for r in replies] == [False, True, True]
    after = await service_metrics(stack, "auth")
    name = "janna_auth_ip_rate_limited_total"
    assert after.total(name) - before.total(name) == 2


def _gateway_env(stack: Stack, fake_openai: FakeOpenAI, tmp: Path) -> dict[str, str]:
    """A gateway of this test's own whose first model cannot be reached."""
    assert stack.addresses is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANNA_")}
    env.update(
        {
            "JANNA_ENV": "development",
            "JANNA_DATA_DIR": str(tmp),
            "JANNA_GATEWAY_PORT": str(_free_port()),
            "JANNA_GATEWAY_METRICS_PORT": str(_free_port()),
            "JANNA_SHUTDOWN_GRACE_S": "2",
            # Its own Redis database: its health keys stay out of the stack's.
            "REDIS_URL": stack.addresses.redis_url.rsplit("/", 1)[0] + "/7",
            "OPENAI_API_KEY": "sk-test-fallback-key",
            "OPENAI_BASE_URL": fake_openai.base_url,
            "JANNA_LOCAL_BASE_URL": f"http://127.0.0.1:{_free_port()}/v1",
            "JANNA_MODEL_ROUTES": "chat=local:llama-3.1-70b,openai:gpt-4o-mini",
            "JANNA_EMBEDDINGS_PROVIDER": "embedded",
        }
    )
    return env


async def test_a_fallback_is_counted_with_the_failed_model_and_its_error(
    stack: Stack, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    env = _gateway_env(stack, fake_openai, tmp_path)
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        address = f"127.0.0.1:{env['JANNA_GATEWAY_PORT']}"
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
            stub = gateway_pb2_grpc.ModelGatewayStub(channel)
            call = stub.Generate(
                gateway_pb2.GenerateRequest(
                    messages=[gateway_pb2.ChatMessage(role="user", content="hi")]
                ),
                timeout=30,
            )
            events = [event async for event in call]
        scraped = await metrics_of(int(env["JANNA_GATEWAY_METRICS_PORT"]))
    finally:
        process.terminate()
        process.wait(15)
        log.close()

    chosen = events[0].model_chosen
    assert (chosen.provider, chosen.fallback) == ("openai", True)
    local = {"provider": "local", "model": "llama-3.1-70b"}
    assert scraped.total("janna_gateway_fallbacks_total", route="chat", **local) == 1
    assert scraped.total("janna_gateway_errors_total", kind="connection", **local) == 1
    assert scraped.total("janna_gateway_requests_total", outcome="error", **local) == 1
    assert (
        scraped.total(
            "janna_gateway_requests_total",
            outcome="ok",
            provider="openai",
            model="gpt-4o-mini",
        )
        == 1
    )
    # The failing mark it left in Redis is what the health gauge reports.
    assert scraped.total("janna_gateway_model_health", state="failing", **local) == 1
    assert "sk-test-fallback-key" not in (tmp_path / "gateway.log").read_text()


async def test_non_admins_cannot_read_the_admin_view(client: httpx.AsyncClient) -> None:
    reply = await client.get("/api/admin/metrics", headers=bearer(new_user()))

    assert reply.status_code == 403
    assert (await client.get("/api/admin/metrics", headers=ADMIN)).status_code == 200
