"""What retrieval counts: how long a search takes and how many passages it returns."""

from __future__ import annotations

import logging

from prometheus_client import Histogram

logger = logging.getLogger(__name__)

SEARCH_DURATION = Histogram(
    "janna_rag_search_duration_seconds",
    "One answered search, the query's embedding included.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SEARCH_RESULTS = Histogram(
    "janna_rag_search_results",
    "Passages one answered search returned; its sum is the results returned.",
    buckets=(0, 1, 2, 3, 5, 10, 20, 50),
)


def searched(seconds: float, results: int) -> None:
    SEARCH_DURATION.observe(seconds)
    SEARCH_RESULTS.observe(results)
