"""Configuration of the retrieval service, read once at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

HNSW_EF_SEARCH_CEILING = 1000
"""pgvector refuses a larger ``hnsw.ef_search``."""


@dataclass(frozen=True)
class RetrievalConfig:
    """How a search chooses between an exact scan and the HNSW index."""

    exact_max_rows: int
    """``JANNA_RAG_EXACT_MAX_ROWS``: a caller with at most this many searchable
    chunks is searched exactly, without the index (10000; see docs/documents.md
    for the measurements behind it)."""
    ef_search_max: int
    """``JANNA_RAG_EF_SEARCH_MAX``: the largest ``hnsw.ef_search`` a search may
    ask for (at most 1000); a caller who would need more is searched exactly."""
    embed_timeout_s: float
    """``JANNA_RAG_EMBED_TIMEOUT_S``: deadline of the query's Embed call."""

    @classmethod
    def from_env(cls, env: Env) -> RetrievalConfig:
        config = cls(
            exact_max_rows=env.integer("JANNA_RAG_EXACT_MAX_ROWS", 10_000),
            ef_search_max=env.integer("JANNA_RAG_EF_SEARCH_MAX", 1000),
            embed_timeout_s=env.number("JANNA_RAG_EMBED_TIMEOUT_S", 10.0),
        )
        if not 1 <= config.ef_search_max <= HNSW_EF_SEARCH_CEILING:
            raise ConfigError(
                f"JANNA_RAG_EF_SEARCH_MAX must be 1 to {HNSW_EF_SEARCH_CEILING}"
            )
        if config.exact_max_rows < 0:
            raise ConfigError("JANNA_RAG_EXACT_MAX_ROWS must not be negative")
        return config
