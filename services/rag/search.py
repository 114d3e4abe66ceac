"""Nearest chunks of one user's ready attachments, by cosine distance in pgvector.

pgvector 0.6 filters *after* the HNSW index scan: the scan yields
``hnsw.ef_search`` candidates (40 by default) nearest to the query among
every user's chunks, and only then are other users' rows dropped. A user
who owns 20 of 20,020 chunks therefore gets none or a few of their own
back, where 5 were asked for. pgvector 0.8's iterative scans fix this;
0.6 has none. So each search picks its path from how many chunks the
caller can search (the sum of their ready attachments' chunk counts, one
cheap indexed query) against the table's size (the planner's row estimate):

* **exact** when the caller has at most ``exact_max_rows`` chunks: their
  rows are read through the ``"userId"`` index, distances computed and the
  best kept. Measured on this machine (2 cores, 384 dimensions): 20 rows
  in about 1 ms, 10,000 in about 35 ms, 20,000 in about 75 ms, whatever
  the other users own. It is also what a small user needs: exact results.
* **HNSW** otherwise, with ``hnsw.ef_search`` raised for this query alone
  to ``limit * total / mine * 2``, so that the candidates the index yields
  hold about twice ``limit`` of the caller's own, and never below 40. Such
  a query takes 1 to 15 ms. If the needed ``ef_search`` would pass
  ``ef_search_max`` (pgvector allows 1000), the caller's share is too small
  for the index to find them and the exact path is taken instead.
* Should the index path still return fewer rows than asked (an unlucky
  graph, or a restriction to a few attachments), the exact path answers.

So a search returns ``min(limit, chunks the caller has)`` results, always.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from services.rag.config import RetrievalConfig

logger = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

DEFAULT_EF_SEARCH = 40
"""pgvector's default, the least a search uses."""
CANDIDATE_MARGIN = 2.0
"""How many times ``limit`` of the caller's rows the index should yield."""


@dataclass(frozen=True)
class Hit:
    chunk_id: uuid.UUID
    attachment_id: uuid.UUID
    filename: str
    page: int | None
    content: str
    score: float
    """Cosine similarity, ``1 - distance``; 1 is identical."""


@dataclass(frozen=True)
class Plan:
    path: str
    """``exact`` or ``hnsw``."""
    ef_search: int
    searchable: int
    """Chunks the caller may be answered from."""


def vector_literal(values: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in values) + "]"


def choose(searchable: int, total: int, limit: int, config: RetrievalConfig) -> Plan:
    """The path for a caller with ``searchable`` of ``total`` chunks."""
    if searchable <= config.exact_max_rows:
        return Plan("exact", 0, searchable)
    share = searchable / max(total, searchable)
    needed = math.ceil(limit * CANDIDATE_MARGIN / share)
    if needed > config.ef_search_max:
        return Plan("exact", 0, searchable)
    return Plan("hnsw", max(needed, DEFAULT_EF_SEARCH, limit), searchable)


_FILTER = """
    c."userId" = $2 AND a.user_id = $2 AND a.status = 'ready'
    AND ($4::uuid[] IS NULL OR c."attachmentId" = ANY($4::uuid[]))
"""

# MATERIALIZED keeps the planner from ordering through the HNSW index.
_EXACT = f"""
WITH mine AS MATERIALIZED (
    SELECT c.id, c.embedding <=> $1::vector AS distance
    FROM document_chunks c JOIN attachments a ON a.id = c."attachmentId"
    WHERE {_FILTER}
), best AS (
    SELECT id, distance FROM mine ORDER BY distance LIMIT $3
)
SELECT c.id, c."attachmentId", c.filename, c."pageNumber", c.content, b.distance
FROM best b JOIN document_chunks c ON c.id = b.id
ORDER BY b.distance
"""

_INDEXED = f"""
SELECT c.id, c."attachmentId", c.filename, c."pageNumber", c.content,
       c.embedding <=> $1::vector AS distance
FROM document_chunks c JOIN attachments a ON a.id = c."attachmentId"
WHERE {_FILTER}
ORDER BY c.embedding <=> $1::vector
LIMIT $3
"""


async def searchable_chunks(
    conn: Conn, user_id: str, attachment_ids: Sequence[uuid.UUID] | None
) -> int:
    count: int = await conn.fetchval(
        """
        SELECT coalesce(sum(chunk_count), 0) FROM attachments
        WHERE user_id = $1 AND status = 'ready'
          AND ($2::uuid[] IS NULL OR id = ANY($2::uuid[]))
        """,
        user_id,
        attachment_ids,
    )
    return count


async def table_rows(conn: Conn) -> int:
    """The planner's estimate of the table's rows; -1 before its first ANALYZE."""
    rows: int = await conn.fetchval(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = 'document_chunks'::regclass"
    )
    return rows


async def search(
    conn: Conn,
    user_id: str,
    embedding: Sequence[float],
    limit: int,
    attachment_ids: Sequence[uuid.UUID] | None,
    config: RetrievalConfig,
    searchable: int | None = None,
) -> tuple[list[Hit], Plan]:
    """The ``limit`` chunks nearest to ``embedding`` that the user may see.

    ``searchable`` is :func:`searchable_chunks` when the caller has counted
    them already.
    """
    if searchable is None:
        searchable = await searchable_chunks(conn, user_id, attachment_ids)
    if searchable == 0:
        return [], Plan("exact", 0, 0)
    plan = choose(searchable, await table_rows(conn), limit, config)
    ids = list(attachment_ids) if attachment_ids is not None else None
    args = (vector_literal(embedding), user_id, limit, ids)
    rows: list[asyncpg.Record] = []
    if plan.path == "hnsw":
        async with conn.transaction():
            # SET LOCAL: the pooled connection goes back with the default.
            await conn.execute(f"SET LOCAL hnsw.ef_search = {int(plan.ef_search)}")
            rows = await conn.fetch(_INDEXED, *args)
        if len(rows) < min(limit, searchable):
            logger.info("index found %d of %d; searching exactly", len(rows), limit)
            plan = Plan("exact", plan.ef_search, searchable)
    if plan.path == "exact":
        rows = await conn.fetch(_EXACT, *args)
    return [
        Hit(
            chunk_id=r["id"],
            attachment_id=r["attachmentId"],
            filename=r["filename"],
            page=r["pageNumber"],
            content=r["content"],
            score=1.0 - float(r["distance"]),
        )
        for r in rows
    ], plan
