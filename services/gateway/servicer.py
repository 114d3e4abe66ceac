"""The gateway's gRPC servicers: the one place its errors become gRPC statuses."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from datetime import timedelta
from typing import TypeAlias

import grpc
from google.protobuf import duration_pb2, empty_pb2
from google.rpc import error_details_pb2

from services.gateway import metrics
from services.gateway.config import GatewayConfig, ModelRef
from services.gateway.embeddings import Embedder, EmbeddingFailed
from services.gateway.health import HealthCache, HealthCacheUnavailable
from services.gateway.metrics import Metrics
from services.gateway.provider import (
    ChatProvider,
    ErrorKind,
    Message,
    Options,
    TextDelta,
)
from services.gateway.router import (
    AllModelsFailed,
    Chosen,
    Done,
    Event,
    InvalidRequest,
    Router,
    StreamInterrupted,
)
from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
)
from services.runtime import errors, identity

logger = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "AI service temporarily unavailable"
"""What the runbook's error toast says; the chat service shows it as is."""

ROLES = frozenset({"system", "user", "assistant"})
MAX_OUTPUT_TOKENS = 32768
MAX_EMBED_TEXTS = 2048
EMBEDDINGS_ROUTE = "embeddings"

_END = object()

GenerateContext: TypeAlias = grpc.aio.ServicerContext[
    gateway_pb2.GenerateRequest, gateway_pb2.GenerateEvent
]


class ModelGatewayServicer(gateway_pb2_grpc.ModelGatewayServicer):
    def __init__(
        self,
        config: GatewayConfig,
        router: Router,
        providers: Mapping[str, ChatProvider],
        embedder: Embedder,
        health: HealthCache,
        stats: Metrics,
    ) -> None:
        self._config = config
        self._router = router
        self._providers = providers
        self._embedder = embedder
        self._health = health
        self._metrics = stats

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: GenerateContext
    ) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        try:
            route, chain = self._router.resolve(request.model)
            messages, options = _parse(request)
        except InvalidRequest as exc:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_REQUEST"
            )

        events: asyncio.Queue[Event | object] = asyncio.Queue()
        pump = asyncio.create_task(
            _pump(self._router.generate(route, chain, messages, options), events)
        )
        # grpc may drop this generator while it is parked at a yield, where
        # no cancellation reaches it: the upstream call must end all the same.
        context.add_done_callback(lambda _context: pump.cancel())
        try:
            while (event := await events.get()) is not _END:
                yield _to_proto(event)
            await pump
        except AllModelsFailed as exc:
            await _abort_all_failed(context, exc)
        except StreamInterrupted as exc:
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"{UNAVAILABLE_MESSAGE}: {exc.ref} stopped mid-answer "
                f"({exc.error.kind}); the answer is incomplete",
                "STREAM_INTERRUPTED",
            )
        finally:
            pump.cancel()
            # When the caller left first, nobody awaits the pump's outcome.
            pump.add_done_callback(_settled)

    async def Embed(
        self,
        request: gateway_pb2.EmbedRequest,
        context: grpc.aio.ServicerContext[
            gateway_pb2.EmbedRequest, gateway_pb2.EmbedResponse
        ],
    ) -> gateway_pb2.EmbedResponse:
        texts = list(request.texts)
        problem = _check_texts(texts)
        if problem is not None:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, problem, "INVALID_REQUEST"
            )
        embedder = self._embedder
        try:
            vectors = await embedder.embed(texts)
        except EmbeddingFailed as exc:
            error = exc.error
            logger.warning(
                "embedding failed provider=%s model=%s kind=%s detail=%s",
                embedder.provider,
                embedder.model,
                error.kind,
                error.detail,
            )
            self._metrics.inc(
                metrics.ERRORS,
                provider=embedder.provider,
                model=embedder.model,
                kind=error.kind,
            )
            if error.kind == ErrorKind.RATE_LIMITED:
                await _abort_rate_limited(
                    context, "embedding service rate limited", error.retry_after_s
                )
            if error.kind == ErrorKind.REJECTED:
                await errors.abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the embedding provider rejected the texts",
                    "EMBEDDING_REJECTED",
                )
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "embedding service temporarily unavailable",
                "EMBEDDING_UNAVAILABLE",
            )
        self._metrics.inc(
            metrics.EMBEDDINGS,
            len(texts),
            provider=embedder.provider,
            model=embedder.model,
        )
        return gateway_pb2.EmbedResponse(
            embeddings=[gateway_pb2.Embedding(values=v) for v in vectors],
            dimension=embedder.dimension,
            model=embedder.model,
        )

    async def ListModels(
        self,
        request: gateway_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[
            gateway_pb2.ListModelsRequest, gateway_pb2.ListModelsResponse
        ],
    ) -> gateway_pb2.ListModelsResponse:
        refs = self._config.models
        cached = await self._health.read(refs)
        models = []
        for ref in refs:
            override = self._providers[ref.provider].health_override(ref.model)
            models.append(
                gateway_pb2.ModelInfo(
                    provider=ref.provider,
                    model=ref.model,
                    health=override or str(cached[ref]),
                    routes=[
                        name
                        for name, chain in self._config.routes.items()
                        if ref in chain
                    ],
                )
            )
        embedder = self._embedder
        models.append(
            gateway_pb2.ModelInfo(
                provider=embedder.provider,
                model=embedder.model,
                health=embedder.health(),
                routes=[EMBEDDINGS_ROUTE],
            )
        )
        routes = [
            gateway_pb2.Route(
                name=name, chain=[f"{ref.provider}:{ref.model}" for ref in chain]
            )
            for name, chain in self._config.routes.items()
        ]
        return gateway_pb2.ListModelsResponse(models=models, routes=routes)


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, health: HealthCache) -> None:
        self._health = health

    async def ClearModelHealth(
        self,
        request: admin_pb2.ClearModelHealthRequest,
        context: grpc.aio.ServicerContext[
            admin_pb2.ClearModelHealthRequest, empty_pb2.Empty
        ],
    ) -> empty_pb2.Empty:
        admin = await identity.admin(context)
        if not request.provider or not request.model:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "provider and model are both required",
                "INVALID_REQUEST",
            )
        try:
            await self._health.clear(ModelRef(request.provider, request.model))
        except HealthCacheUnavailable:
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the health cache (Redis) cannot be reached",
                "HEALTH_CACHE_UNAVAILABLE",
            )
        logger.info(
            "model health cleared provider=%s model=%s by=%s",
            request.provider,
            request.model,
            admin.user_id,
        )
        return empty_pb2.Empty()


async def _pump(
    events: AsyncGenerator[Event, None], queue: asyncio.Queue[Event | object]
) -> None:
    """Runs one generation in its own task, so that cancelling it always lands
    inside the provider call, whose ``async with`` closes the connection."""
    try:
        async with aclosing(events):
            async for event in events:
                queue.put_nowait(event)
    finally:
        queue.put_nowait(_END)


def _settled(pump: asyncio.Task[None]) -> None:
    if not pump.cancelled():
        pump.exception()


def _parse(request: gateway_pb2.GenerateRequest) -> tuple[list[Message], Options]:
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"messages[{index}].role must be system, user or assistant, "
                f"got {message.role!r}"
            )
        messages.append(Message(message.role, message.content))
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("messages must include a user message")
    temperature = None
    if request.HasField("temperature"):
        temperature = request.temperature
        if not 0.0 <= temperature <= 2.0:
            raise InvalidRequest("temperature must be between 0 and 2")
    max_tokens = None
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if not 0 < max_tokens <= MAX_OUTPUT_TOKENS:
            raise InvalidRequest(
                f"max_tokens must be between 1 and {MAX_OUTPUT_TOKENS}"
            )
    return messages, Options(temperature=temperature, max_tokens=max_tokens)


def _check_texts(texts: list[str]) -> str | None:
    if len(texts) > MAX_EMBED_TEXTS:
        return f"at most {MAX_EMBED_TEXTS} texts per call, got {len(texts)}"
    for index, text in enumerate(texts):
        if not text.strip():
            return f"texts[{index}] is empty"
    return None


def _to_proto(event: Event | object) -> gateway_pb2.GenerateEvent:
    if isinstance(event, TextDelta):
        return gateway_pb2.GenerateEvent(delta=event.text)
    if isinstance(event, Chosen):
        return gateway_pb2.GenerateEvent(
            model_chosen=gateway_pb2.ModelChosen(
                provider=event.ref.provider,
                model=event.ref.model,
                fallback=event.fallback,
                skipped=event.skipped,
            )
        )
    if isinstance(event, Done):
        return gateway_pb2.GenerateEvent(
            done=gateway_pb2.GenerateDone(
                provider=event.ref.provider,
                model=event.ref.model,
                finish_reason=event.finish.reason,
                usage=gateway_pb2.TokenUsage(
                    input_tokens=event.finish.input_tokens,
                    output_tokens=event.finish.output_tokens,
                ),
            )
        )
    raise TypeError(f"not a generation event: {event!r}")


async def _abort_all_failed(context: GenerateContext, exc: AllModelsFailed) -> None:
    logger.warning(
        "no model answered route=%s tried=%s",
        exc.route,
        ", ".join(f"{ref}={error.kind}" for ref, error in exc.failures),
    )
    if exc.rate_limited:
        await _abort_rate_limited(context, "AI service rate limited", exc.retry_after_s)
    if exc.warming:
        await errors.abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"{UNAVAILABLE_MESSAGE}: the local model is still loading",
            "MODEL_WARMING",
        )
    await errors.abort(
        context, grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE, "ALL_MODELS_FAILED"
    )


async def _abort_rate_limited(
    context: grpc.aio.ServicerContext[object, object],
    message: str,
    retry_after_s: float | None,
) -> None:
    if retry_after_s is None:
        await errors.abort(
            context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, "RATE_LIMITED"
        )
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(seconds=retry_after_s))
    await errors.abort(
        context,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{message}; retry after {math.ceil(retry_after_s)}s",
        "RATE_LIMITED",
        error_details_pb2.RetryInfo(retry_delay=delay),
    )
