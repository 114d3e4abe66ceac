"""Embedding chunks through the model gateway, in batches, retrying a busy gateway."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import grpc

from services.ingest.config import WorkerConfig
from services.proto.janna.v1 import gateway_pb2, gateway_pb2_grpc

logger = logging.getLogger(__name__)

# A provider's 429 arrives as RESOURCE_EXHAUSTED; the others are a gateway
# that is restarting or slow. Anything else will not improve by waiting.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_MAX_BACKOFF_S = 30.0


class EmbeddingFailed(RuntimeError):
    """The gateway did not embed a batch; the job should be tried again later."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Embedder:
    """Calls ``ModelGateway.Embed`` for the worker."""

    def __init__(
        self, channel: grpc.aio.Channel, config: WorkerConfig, dimension: int
    ) -> None:
        self._stub = gateway_pb2_grpc.ModelGatewayStub(channel)
        self._config = config
        self._dimension = dimension

    async def embed(
        self, texts: Sequence[str], metadata: tuple[tuple[str, str], ...]
    ) -> list[list[float]]:
        vectors: list[list[float]] = []
        size = self._config.embed_batch
        for start in range(0, len(texts), size):
            vectors.extend(await self._batch(texts[start : start + size], metadata))
        return vectors

    async def _batch(
        self, texts: Sequence[str], metadata: tuple[tuple[str, str], ...]
    ) -> list[list[float]]:
        attempts = self._config.embed_attempts
        for attempt in range(1, attempts + 1):
            try:
                reply = await self._stub.Embed(
                    gateway_pb2.EmbedRequest(texts=list(texts)),
                    metadata=metadata,
                    timeout=self._config.embed_timeout_s,
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRYABLE or attempt == attempts:
                    raise EmbeddingFailed(_describe(code), code) from exc
                delay = min(
                    self._config.embed_backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S
                )
                delay *= random.uniform(0.8, 1.2)
                logger.info(
                    "embed retry %d/%d in %.1fs after %s",
                    attempt,
                    attempts,
                    delay,
                    code.name,
                )
                await asyncio.sleep(delay)
                continue
            return self._vectors(reply, len(texts))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _vectors(
        self, reply: gateway_pb2.EmbedResponse, count: int
    ) -> list[list[float]]:
        if len(reply.embeddings) != count:
            raise EmbeddingFailed(
                f"the gateway returned {len(reply.embeddings)} embeddings for "
                f"{count} texts"
            )
        vectors = [list(e.values) for e in reply.embeddings]
        if any(len(v) != self._dimension for v in vectors):
            raise EmbeddingFailed(
                f"the embedding model returns {reply.dimension} dimensions but the "
                f"database stores {self._dimension} (JANNA_EMBEDDING_DIM)"
            )
        return vectors


def _describe(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "the embedding service is rate limited"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "the embedding service is unavailable"
    return f"the embedding service failed ({code.name})"
