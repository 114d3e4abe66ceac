"""Generate through real SDKs against fake providers: streaming, fallback, health."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as redis

from services.gateway import metrics
from services.proto.janna.v1 import admin_pb2, gateway_pb2
from tests.gateway.conftest import StartGateway
from tests.gateway.fakes import (
    Behaviour,
    Fake,
    closed_port,
    cut,
    hang,
    malformed,
    ok,
    slow,
    status,
    wait_for,
)
from tests.gateway.helpers import ask, collect, kinds, reason, retry_delay, text_of

LOCAL = "llama-3.1-70b"
OPENAI = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5-20251001"
CHAIN = f"chat=local:{LOCAL},openai:{OPENAI},anthropic:{CLAUDE}"
HEALTH_LOCAL = f"health:local:{LOCAL}"
HEALTH_OPENAI = f"health:openai:{OPENAI}"
HEALTH_CLAUDE = f"health:anthropic:{CLAUDE}"
HANG_LIMIT_S = "1"
ADMIN_METADATA = (("x-user-id", "admin"), ("x-user-groups", "admin"))
"""The TTFT limit where a fake hangs: short, but far above a fake's answer."""


async def test_openai_stream_is_relayed_with_model_and_usage(
    start_gateway: StartGateway, fake_openai: Fake, kv_client: redis.Redis
) -> None:
    fake_openai.behave(OPENAI, ok("Hello", ",", " world"))
    running = await start_gateway(JANNA_MODEL_ROUTES=f"chat=openai:{OPENAI}")

    request = ask("Say hello", temperature=0.2, max_tokens=50)
    request.messages.insert(
        0, gateway_pb2.ChatMessage(role="system", content="Be brief.")
    )
    events, error = await collect(running.stub.Generate(request))

    assert error is None
    assert kinds(events) == ["model_chosen", "delta", "delta", "delta", "done"]
    chosen = events[0].model_chosen
    assert (chosen.provider, chosen.model, chosen.fallback) == ("openai", OPENAI, False)
    assert text_of(events) == "Hello, world"
    done = events[-1].done
    assert (done.provider, done.model, done.finish_reason) == ("openai", OPENAI, "stop")
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)

    body = fake_openai.calls(OPENAI)[0].body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    assert body["max_completion_tokens"] == 50
    assert body["temperature"] == pytest.approx(0.2)
    assert (
        fake_openai.calls()[0].headers["authorization"]
        == "Bearer sk-test-not-a-real-key"
    )
    assert await kv_client.get(HEALTH_OPENAI) == "1"


async def test_local_server_gets_max_tokens(
    start_gateway: StartGateway, fake_local: Fake
) -> None:
    running = await start_gateway(JANNA_MODEL_ROUTES=f"chat=local:{LOCAL}")

    events, error = await collect(running.stub.Generate(ask(max_tokens=7)))

    assert error is None
    assert text_of(events) == f"Hello from {LOCAL}"
    body = fake_local.calls(LOCAL)[0].body
    assert body["max_tokens"] == 7
    assert "max_completion_tokens" not in body


async def test_anthropic_gets_system_prompt_and_alternating_roles(
    start_gateway: StartGateway, fake_anthropic: Fake
) -> None:
    fake_anthropic.behave(CLAUDE, ok("Bonjour", " !"))
    running = await start_gateway(JANNA_MODEL_ROUTES=f"chat=anthropic:{CLAUDE}")
    request = gateway_pb2.GenerateRequest(
        messages=[
            gateway_pb2.ChatMessage(role="system", content="You are terse."),
            gateway_pb2.ChatMessage(role="user", content="Hi"),
            gateway_pb2.ChatMessage(role="assistant", content="Hello."),
            gateway_pb2.ChatMessage(role="system", content="Answer in French."),
            gateway_pb2.ChatMessage(role="user", content="Context: a doc."),
            gateway_pb2.ChatMessage(role="user", content="Greet me."),
        ]
    )

    events, error = await collect(running.stub.Generate(request))

    assert error is None
    assert text_of(events) == "Bonjour !"
    done = events[-1].done
    assert (done.provider, done.finish_reason) == ("anthropic", "stop")
    assert (done.usage.input_tokens, done.usage.output_tokens) == (7, 2)
    call = fake_anthropic.calls(CLAUDE)[0]
    assert call.body["system"] == "You are terse.\n\nAnswer in French."
    assert call.body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Context: a doc.\n\nGreet me."},
    ]
    assert call.body["max_tokens"] == 1024
    assert call.body["stream"] is True
    assert call.headers["authorization"] == "Bearer sk-ant-test-not-a-real-key"


async def test_fallback_order_and_what_the_stream_reports(
    start_gateway: StartGateway,
    fake_openai: Fake,
    fake_anthropic: Fake,
    kv_client: redis.Redis,
) -> None:
    fake_openai.behave(OPENAI, status(500))
    fake_anthropic.behave(CLAUDE, ok("Saved", " by", " Claude"))
    running = await start_gateway(
        JANNA_MODEL_ROUTES=CHAIN,
        JANNA_LOCAL_BASE_URL=f"http://127.0.0.1:{closed_port()}/v1",
    )

    events, error = await collect(running.stub.Generate(ask()))

    assert error is None
    chosen = events[0].model_chosen
    assert (chosen.provider, chosen.model, chosen.fallback) == (
        "anthropic",
        CLAUDE,
        True,
    )
    assert len(chosen.skipped) == 2
    assert list(chosen.skipped) == [
        f"local:{LOCAL}: connection: could not connect",
        f"openai:{OPENAI}: server_error: HTTP 500",
    ]
    assert text_of(events) == "Saved by Claude"
    assert events[-1].done.provider == "anthropic"
    # Each model was asked once, in chain order.
    assert len(fake_openai.calls()) == 1
    assert fake_openai.calls()[0].at < fake_anthropic.calls()[0].at

    assert await kv_client.get(HEALTH_LOCAL) == "0"
    assert await kv_client.get(HEALTH_OPENAI) == "0"
    assert await kv_client.get(HEALTH_CLAUDE) == "1"
    assert 0 < await kv_client.pttl(HEALTH_OPENAI) <= 30_000
    assert await kv_client.ttl(HEALTH_CLAUDE) == -1

    stats = running.gateway.metrics
    assert stats.value(metrics.FALLBACKS, route="chat", provider="local", model=LOCAL)
    assert stats.value(metrics.FALLBACKS, route="chat", provider="openai", model=OPENAI)
    assert stats.value(metrics.ERRORS, provider="local", model=LOCAL, kind="connection")
    assert stats.value(
        metrics.ERRORS, provider="openai", model=OPENAI, kind="server_error"
    )
    assert stats.value(
        metrics.REQUESTS, provider="anthropic", model=CLAUDE, outcome="ok"
    )
    assert (
        stats.value(metrics.TOKENS, provider="anthropic", model=CLAUDE, direction="out")
        == 3
    )
    snapshot = stats.snapshot()
    [ttft] = snapshot["histograms"][metrics.TTFT]
    assert ttft["labels"] == {"provider": "anthropic", "model": CLAUDE}
    assert ttft["count"] == 1


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (status(500), "server_error"),
        (status(503), "server_error"),
        (status(429, retry_after="2"), "rate_limited"),
        (status(401), "auth"),
        (malformed(), "malformed"),
        (hang(), "ttft"),
        (cut(after=0), "connection"),
    ],
    ids=["500", "503", "429", "401", "malformed", "hang", "cut-before-first"],
)
async def test_every_failure_before_the_first_token_falls_back(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    kv_client: redis.Redis,
    failure: Behaviour,
    kind: str,
) -> None:
    fake_local.behave(LOCAL, failure)
    running = await start_gateway(
        JANNA_MODEL_ROUTES=CHAIN, JANNA_TTFT_LIMIT_S=HANG_LIMIT_S
    )

    events, error = await collect(running.stub.Generate(ask()))

    assert error is None
    chosen = events[0].model_chosen
    assert (chosen.provider, chosen.fallback) == ("openai", True)
    assert len(chosen.skipped) == 1
    assert chosen.skipped[0].startswith(f"local:{LOCAL}: {kind}: ")
    assert text_of(events) == f"Hello from {OPENAI}"
    assert await kv_client.get(HEALTH_LOCAL) == "0"
    if failure.kind == "hang":
        # The hung request was closed, not left open upstream.
        await asyncio.wait_for(fake_local.disconnected.wait(), 5)


async def test_rate_limit_keeps_the_model_out_only_as_long_as_retry_after(
    start_gateway: StartGateway, fake_local: Fake, kv_client: redis.Redis
) -> None:
    fake_local.behave(LOCAL, status(429, retry_after="3"))
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN)

    await collect(running.stub.Generate(ask()))

    assert 0 < await kv_client.pttl(HEALTH_LOCAL) <= 3000


@pytest.mark.parametrize(
    ("failure", "detail"),
    [(cut(after=3), "connection"), (malformed(after=3), "malformed")],
    ids=["cut-after-three", "malformed-after-three"],
)
@pytest.mark.parametrize("provider", ["local", "anthropic"])
async def test_no_fallback_after_the_first_token(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    fake_anthropic: Fake,
    kv_client: redis.Redis,
    failure: Behaviour,
    detail: str,
    provider: str,
) -> None:
    fake, model = (
        (fake_local, LOCAL) if provider == "local" else (fake_anthropic, CLAUDE)
    )
    fake.behave(model, failure)
    running = await start_gateway(
        JANNA_MODEL_ROUTES=f"chat={provider}:{model},openai:{OPENAI}"
    )

    events, error = await collect(running.stub.Generate(ask()))

    assert kinds(events) == ["model_chosen", "delta", "delta", "delta"]
    assert text_of(events) == "t0 t1 t2 "
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(error) == "STREAM_INTERRUPTED"
    assert f"{provider}:{model}" in (error.details() or "")
    assert detail in (error.details() or "")
    # Nothing was repeated by another model.
    assert fake_openai.calls() == []
    assert await kv_client.get(f"health:{provider}:{model}") == "0"
    assert (
        running.gateway.metrics.value(
            metrics.REQUESTS, provider=provider, model=model, outcome="error"
        )
        == 1
    )


async def test_a_failing_model_is_skipped_while_its_key_lives(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    kv_client: redis.Redis,
) -> None:
    await kv_client.set(HEALTH_LOCAL, "0")
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN)

    events, error = await collect(running.stub.Generate(ask()))

    assert error is None
    assert fake_local.calls() == []
    chosen = events[0].model_chosen
    assert (chosen.provider, chosen.fallback) == ("openai", True)
    assert list(chosen.skipped) == [
        f"local:{LOCAL}: marked failing in the health cache"
    ]

    # redis-cli DEL makes it eligible at once.
    await kv_client.delete(HEALTH_LOCAL)
    events, error = await collect(running.stub.Generate(ask()))
    assert events[0].model_chosen.provider == "local"
    assert len(fake_local.calls()) == 1
    assert await kv_client.get(HEALTH_LOCAL) == "1"


async def test_clear_model_health_makes_a_model_eligible(
    start_gateway: StartGateway, fake_local: Fake, kv_client: redis.Redis
) -> None:
    await kv_client.set(HEALTH_LOCAL, "0", ex=30)
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.admin.ClearModelHealth(
            admin_pb2.ClearModelHealthRequest(provider="local", model=LOCAL),
            metadata=(("x-user-id", "u1"),),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await kv_client.get(HEALTH_LOCAL) == "0"

    await running.admin.ClearModelHealth(
        admin_pb2.ClearModelHealthRequest(provider="local", model=LOCAL),
        metadata=ADMIN_METADATA,
    )

    assert await kv_client.get(HEALTH_LOCAL) is None
    events, _ = await collect(running.stub.Generate(ask()))
    assert events[0].model_chosen.provider == "local"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.admin.ClearModelHealth(
            admin_pb2.ClearModelHealthRequest(provider="local"),
            metadata=ADMIN_METADATA,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_failing_mark_expires_after_the_ttl(
    start_gateway: StartGateway, fake_local: Fake, kv_client: redis.Redis
) -> None:
    fake_local.behave(LOCAL, status(500), ok("back"))
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN, JANNA_HEALTH_TTL_S="0.3")

    events, _ = await collect(running.stub.Generate(ask()))
    assert events[0].model_chosen.provider == "openai"
    assert await kv_client.get(HEALTH_LOCAL) == "0"

    await wait_for(lambda: _gone(kv_client, HEALTH_LOCAL))
    events, _ = await collect(running.stub.Generate(ask()))

    assert events[0].model_chosen.provider == "local"
    assert text_of(events) == "back"
    assert await kv_client.get(HEALTH_LOCAL) == "1"


async def _gone(client: redis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_when_every_model_is_marked_failing_all_are_tried(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    kv_client: redis.Redis,
) -> None:
    for key in (HEALTH_LOCAL, HEALTH_OPENAI, HEALTH_CLAUDE):
        await kv_client.set(key, "0", ex=30)
    fake_local.behave(LOCAL, status(500))
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN)

    events, error = await collect(running.stub.Generate(ask()))

    assert error is None
    assert len(fake_local.calls()) == 1
    assert events[0].model_chosen.provider == "openai"
    assert await kv_client.get(HEALTH_OPENAI) == "1"


@pytest.mark.parametrize(
    ("local", "openai", "anthropic"),
    [
        (status(500), status(502), status(401)),
        (status(429, "4"), status(500), status(429, "4")),
        (hang(), malformed(), status(503)),
    ],
    ids=["errors", "some-429", "hang-malformed-503"],
)
async def test_all_failing_is_unavailable(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    fake_anthropic: Fake,
    local: Behaviour,
    openai: Behaviour,
    anthropic: Behaviour,
) -> None:
    fake_local.behave(LOCAL, local)
    fake_openai.behave(OPENAI, openai)
    fake_anthropic.behave(CLAUDE, anthropic)
    running = await start_gateway(
        JANNA_MODEL_ROUTES=CHAIN, JANNA_TTFT_LIMIT_S=HANG_LIMIT_S
    )

    events, error = await collect(running.stub.Generate(ask()))

    assert events == []
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "AI service temporarily unavailable"
    assert reason(error) == "ALL_MODELS_FAILED"
    assert running.gateway.metrics.value(metrics.UNANSWERED, route="chat") == 1


async def test_all_rate_limited_is_resource_exhausted_with_retry_after(
    start_gateway: StartGateway,
    fake_local: Fake,
    fake_openai: Fake,
    fake_anthropic: Fake,
) -> None:
    fake_local.behave(LOCAL, status(429, "20"))
    fake_openai.behave(OPENAI, status(429, "7"))
    fake_anthropic.behave(CLAUDE, status(429, "9"))
    running = await start_gateway(JANNA_MODEL_ROUTES=CHAIN)

    events, error = await collect(running.stub.Generate(ask()))

    assert events == []
    assert error is not None
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == "RATE_LIMITED"
    assert "retry after 7s" in (error.details() or "")
    assert retry_delay(error) == 7.0


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_cancel_closes_the_upstream_connection(
    start_gateway: StartGateway,
    fake_openai: Fake,
    fake_anthropic: Fake,
    provider: str,
) -> None:
    fake, model = (
        (fake_openai, OPENAI) if provider == "openai" else (fake_anthropic, CLAUDE)
    )
    fake.behave(model, slow(count=200, interval=0.02))
    running = await start_gateway(JANNA_MODEL_ROUTES=f"chat={provider}:{model}")

    call = running.stub.Generate(ask())
    assert (await call.read()).WhichOneof("event") == "model_chosen"
    assert (await call.read()).delta == "w0 "
    assert (await call.read()).delta == "w1 "
    call.cancel()

    await asyncio.wait_for(fake.disconnected.wait(), 5)
    [sent] = fake.sent_before_disconnect
    assert sent < 200
    await wait_for(
        lambda: (
            running.gateway.metrics.value(
                metrics.REQUESTS, provider=provider, model=model, outcome="cancelled"
            )
            == 1
        )
    )


async def test_serves_without_redis(
    start_gateway: StartGateway, fake_local: Fake
) -> None:
    fake_local.behave(LOCAL, status(500))
    running = await start_gateway(
        JANNA_MODEL_ROUTES=CHAIN, REDIS_URL=f"redis://127.0.0.1:{closed_port()}/0"
    )

    for _ in range(2):
        events, error = await collect(running.stub.Generate(ask()))
        assert error is None
        assert events[0].model_chosen.provider == "openai"
    # Without the cache nothing remembers local failing: it is tried each time.
    assert len(fake_local.calls()) == 2

    listed = await running.stub.ListModels(gateway_pb2.ListModelsRequest())
    assert {m.health for m in listed.models if m.provider == "local"} == {"unchecked"}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.admin.ClearModelHealth(
            admin_pb2.ClearModelHealthRequest(provider="local", model=LOCAL),
            metadata=ADMIN_METADATA,
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_list_models_reports_health_and_routes(
    start_gateway: StartGateway, kv_client: redis.Redis
) -> None:
    await kv_client.set(HEALTH_LOCAL, "0")
    await kv_client.set(HEALTH_OPENAI, "1")
    running = await start_gateway(
        JANNA_MODEL_ROUTES=(
            f"chat=local:{LOCAL},openai:{OPENAI};title=openai:{OPENAI},"
            f"anthropic:{CLAUDE}"
        )
    )

    listed = await running.stub.ListModels(gateway_pb2.ListModelsRequest())

    rows = [(m.provider, m.model, m.health, list(m.routes)) for m in listed.models]
    assert rows == [
        ("local", LOCAL, "failing", ["chat"]),
        ("openai", OPENAI, "healthy", ["chat", "title"]),
        ("anthropic", CLAUDE, "unchecked", ["title"]),
        ("openai", "text-embedding-3-small", "unchecked", ["embeddings"]),
    ]


async def test_a_model_can_be_named_directly_or_by_route(
    start_gateway: StartGateway, fake_anthropic: Fake
) -> None:
    running = await start_gateway(
        JANNA_MODEL_ROUTES=f"chat=local:{LOCAL};title=anthropic:{CLAUDE}"
    )

    events, _ = await collect(running.stub.Generate(ask(model="title")))
    assert events[0].model_chosen.model == CLAUDE
    events, _ = await collect(running.stub.Generate(ask(model="openai:gpt-4.1")))
    assert events[0].model_chosen.model == "gpt-4.1"


@pytest.mark.parametrize(
    "request_",
    [
        ask(model="nonexistent"),
        ask(model="mistral:large"),
        ask(temperature=2.5),
        ask(max_tokens=0),
        gateway_pb2.GenerateRequest(),
        gateway_pb2.GenerateRequest(
            messages=[gateway_pb2.ChatMessage(role="tool", content="x")]
        ),
        gateway_pb2.GenerateRequest(
            messages=[gateway_pb2.ChatMessage(role="system", content="x")]
        ),
    ],
    ids=["route", "provider", "temperature", "max-tokens", "empty", "role", "system"],
)
async def test_invalid_requests_are_rejected(
    start_gateway: StartGateway, request_: gateway_pb2.GenerateRequest
) -> None:
    running = await start_gateway(JANNA_MODEL_ROUTES=f"chat=openai:{OPENAI}")

    events, error = await collect(running.stub.Generate(request_))

    assert events == []
    assert error is not None
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "INVALID_REQUEST"
