"""The retrieval service's one call, Search, and its error boundary."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, TypeAlias

import asyncpg
import grpc

from services.proto.janna.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    rag_pb2,
    rag_pb2_grpc,
)
from services.rag import metrics, search
from services.rag.config import RetrievalConfig
from services.runtime import errors, identity

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 5
MAX_LIMIT = 50
MAX_QUERY_CHARS = 4000

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

DATABASE_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    OSError,
)


class BadRequest(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class EmbeddingUnavailable(RuntimeError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


def _request(request: rag_pb2.SearchRequest) -> tuple[str, int, list[uuid.UUID] | None]:
    query = request.query.strip()
    if not query:
        raise BadRequest("query is empty", "EMPTY_QUERY")
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(
            f"query is longer than {MAX_QUERY_CHARS} characters", "QUERY_TOO_LONG"
        )
    limit = request.limit or DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be 1 to {MAX_LIMIT}", "BAD_LIMIT")
    ids: list[uuid.UUID] | None = None
    if request.attachment_ids:
        try:
            ids = [uuid.UUID(raw) for raw in request.attachment_ids]
        except ValueError as exc:
            raise BadRequest(
                "attachmentIds must be attachment ids", "BAD_ATTACHMENT_ID"
            ) from exc
    return query, limit, ids


class RetrievalServicer(rag_pb2_grpc.RetrievalServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, gateway: grpc.aio.Channel, config: RetrievalConfig
    ) -> None:
        self._pool = pool
        self._gateway = gateway_pb2_grpc.ModelGatewayStub(gateway)
        self._config = config

    async def _embed(self, query: str, caller: identity.Caller) -> list[float]:
        try:
            reply = await self._gateway.Embed(
                gateway_pb2.EmbedRequest(texts=[query]),
                metadata=caller.metadata(),
                timeout=self._config.embed_timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise EmbeddingUnavailable(exc.code()) from exc
        if len(reply.embeddings) != 1:
            raise EmbeddingUnavailable(grpc.StatusCode.INTERNAL)
        return list(reply.embeddings[0].values)

    async def Search(
        self, request: rag_pb2.SearchRequest, context: Context
    ) -> rag_pb2.SearchResponse:
        caller = await identity.caller(context)
        started = time.perf_counter()
        try:
            query, limit, ids = _request(request)
            async with self._pool.acquire() as conn:
                searchable = await search.searchable_chunks(conn, caller.user_id, ids)
            if searchable == 0:
                # Nothing to search: no query embedding, no model call.
                metrics.searched(time.perf_counter() - started, 0)
                return rag_pb2.SearchResponse()
            embedding = await self._embed(query, caller)
            async with self._pool.acquire() as conn:
                hits, plan = await search.search(
                    conn,
                    caller.user_id,
                    embedding,
                    limit,
                    ids,
                    self._config,
                    searchable,
                )
        except BadRequest as exc:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason
            )
        except EmbeddingUnavailable as exc:
            logger.warning("query embedding failed: %s", exc.code.name)
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await errors.abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the embedding service is busy; try again shortly",
                )
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "search is unavailable: the embedding service did not answer",
                "EMBEDDING_UNAVAILABLE",
            )
        except DATABASE_ERRORS as exc:
            logger.warning("database unavailable: %s", type(exc).__name__)
            await errors.abort(
                context, grpc.StatusCode.UNAVAILABLE, "the database is unavailable"
            )
        elapsed = time.perf_counter() - started
        metrics.searched(elapsed, len(hits))
        logger.info(
            "search path=%s ef_search=%d searchable=%d hits=%d %.1fms",
            plan.path,
            plan.ef_search,
            plan.searchable,
            len(hits),
            elapsed * 1000,
        )
        return rag_pb2.SearchResponse(
            chunks=[
                rag_pb2.Chunk(
                    chunk_id=str(h.chunk_id),
                    attachment_id=str(h.attachment_id),
                    filename=h.filename,
                    page=h.page or 0,
                    content=h.content,
                    score=h.score,
                )
                for h in hits
            ],
            searchable_chunks=plan.searchable,
        )
