"""In-process counters and histograms of the gateway, read as one snapshot.

The names and labels follow Prometheus conventions so that exporting them is a
matter of formatting :meth:`Metrics.snapshot`. Everything here runs on the
event loop, so no locking is needed.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]

REQUESTS = "gateway_requests_total"
"""Attempts at one model: labels provider, model, outcome (ok, error, cancelled)."""
ERRORS = "gateway_errors_total"
"""Provider errors: labels provider, model, kind (the runbook's errors by provider)."""
FALLBACKS = "gateway_fallbacks_total"
"""Moves to the next model of a chain: labels route, provider, model (that failed)."""
UNANSWERED = "gateway_unanswered_total"
"""Requests that no model of the chain answered: label route."""
TOKENS = "gateway_tokens_total"
"""Tokens: labels provider, model, direction (in, out)."""
EMBEDDINGS = "gateway_embedded_texts_total"
"""Texts embedded: labels provider, model."""
EMBED_RETRIES = "gateway_embed_retries_total"
"""Embedding calls retried: labels provider, model, kind."""
TTFT = "gateway_time_to_first_token_seconds"
"""From the start of an attempt to its first token: labels provider, model."""
DURATION = "gateway_generation_seconds"
"""From the start of an answered attempt to its end: labels provider, model."""

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class _Histogram:
    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        counts = self.counts or [0] * (len(self.bounds) + 1)
        cumulative, running = {}, 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], counts, strict=True):
            running += count
            cumulative[bound] = running
        return {"count": self.count, "sum": self.total, "buckets": cumulative}


class Metrics:
    """Counters and histograms keyed by name and labels."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, _Histogram]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        series = self._counters.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        series = self._histograms.setdefault(name, {})
        key = tuple(sorted(labels.items()))
        histogram = series.get(key)
        if histogram is None:
            histogram = series[key] = _Histogram(SECONDS_BUCKETS)
        histogram.observe(value)

    def value(self, name: str, **labels: str) -> float:
        """One counter's value (0 when never incremented)."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """A counter summed over every series whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for key, value in self._counters.get(name, {}).items()
            if wanted <= set(key)
        )

    def snapshot(self) -> dict[str, Any]:
        """Every series as plain data: ``{"counters": ..., "histograms": ...}``."""
        return {
            "counters": {
                name: [
                    {"labels": dict(key), "value": value}
                    for key, value in sorted(series.items())
                ]
                for name, series in sorted(self._counters.items())
            },
            "histograms": {
                name: [
                    {"labels": dict(key), **histogram.snapshot()}
                    for key, histogram in sorted(series.items())
                ]
                for name, series in sorted(self._histograms.items())
            },
        }
