"""Reading other services' Prometheus endpoints: fetch, parse, add up, quantiles.

A service may run as several replicas, each with its own endpoint; what
:func:`scrape` returns adds up the samples of every replica that answered,
which is right for counters and histograms (each replica counts its own
requests) and wrong for gauges of shared state (every ingest replica reports
the same queue), which :meth:`Scraped.shared` reads from one replica instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One line of an exposition: a sample's name, labels and value."""

    name: str
    labels: Mapping[str, str]
    value: float
    replica: int
    """Which of the scraped targets it came from."""


@dataclass(frozen=True)
class Scraped:
    """The samples of every replica of one service that answered."""

    samples: tuple[Sample, ...]
    answered: int
    """How many of the targets answered."""
    targets: int

    def matching(self, name: str, **labels: str) -> Iterator[Sample]:
        """The samples called ``name`` whose labels include ``labels``."""
        for sample in self.samples:
            if sample.name == name and all(
                sample.labels.get(key) == value for key, value in labels.items()
            ):
                yield sample

    def total(self, name: str, **labels: str) -> float:
        """The sum over every matching sample of every replica."""
        return sum(s.value for s in self.matching(name, **labels))

    def shared(self, name: str, **labels: str) -> float | None:
        """A gauge of state the replicas share: the first replica's figure."""
        replicas: dict[int, float] = {}
        for sample in self.matching(name, **labels):
            replicas[sample.replica] = replicas.get(sample.replica, 0.0) + sample.value
        return replicas[min(replicas)] if replicas else None

    def label_values(self, name: str, label: str) -> list[str]:
        """The values ``label`` takes across the samples called ``name``."""
        return sorted(
            {s.labels[label] for s in self.matching(name) if label in s.labels}
        )

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets ``(upper bound, count)``, added up
        over every matching series; ``name`` is the histogram's base name."""
        counts: dict[float, float] = {}
        for sample in self.matching(f"{name}_bucket", **labels):
            bound = float(sample.labels.get("le", "nan"))
            if not math.isnan(bound):
                counts[bound] = counts.get(bound, 0.0) + sample.value
        return sorted(counts.items())


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram, as Prometheus's histogram_quantile.

    ``buckets`` are cumulative ``(upper bound, count)`` pairs in order, the
    last one ``+Inf``. Within a bucket observations are taken as spread
    evenly; one that falls in the ``+Inf`` bucket counts as the largest
    finite bound. None when the histogram is empty.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def parse(text: str, replica: int = 0) -> list[Sample]:
    """Every sample of a text exposition."""
    return [
        Sample(sample.name, dict(sample.labels), sample.value, replica)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def _fetch(
    client: httpx.AsyncClient, target: str, replica: int, timeout_s: float
) -> list[Sample] | None:
    try:
        reply = await client.get(f"http://{target}/metrics", timeout=timeout_s)
        reply.raise_for_status()
        return parse(reply.text, replica)
    except (httpx.HTTPError, ValueError) as exc:
        logger.warning("metrics of %s not read: %s", target, exc)
        return None


async def scrape(
    client: httpx.AsyncClient, targets: Sequence[str], timeout_s: float
) -> Scraped | None:
    """Every target's samples; None when none of them answered in time."""
    results = await asyncio.gather(
        *(
            _fetch(client, target, replica, timeout_s)
            for replica, target in enumerate(targets)
        )
    )
    answered = [r for r in results if r is not None]
    if not answered:
        return None
    return Scraped(
        samples=tuple(s for result in answered for s in result),
        answered=len(answered),
        targets=len(targets),
    )
