"""The gateway's own counters (:mod:`services.gateway.metrics`), for Prometheus.

The router and servicers count into :class:`~services.gateway.metrics.Metrics`
on the event loop; when Prometheus asks, one snapshot of it is taken there
(see :class:`~services.runtime.metrics.LoopCollector`) and written out under
``janna_``-prefixed names, with two gauges beside it: which models are
configured (``janna_gateway_model_info``, with their routes) and the health
each one has now (``janna_gateway_model_health``, one series per state, 1 for
the current one), read from the Redis health cache as ``GET /api/models`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from services.gateway import metrics
from services.gateway.health import Health
from services.gateway.metrics import Metrics
from services.runtime.metrics import LoopCollector

if TYPE_CHECKING:
    from services.gateway.service import Gateway

logger = logging.getLogger(__name__)

PREFIX = "janna_"

_HELP = {
    metrics.REQUESTS: "Attempts at one model, by outcome (ok, error, cancelled).",
    metrics.ERRORS: "Provider errors, by provider, model and kind.",
    metrics.FALLBACKS: "Moves to the next model of a route; labels name the "
    "model that failed.",
    metrics.UNANSWERED: "Requests that no model of the route answered.",
    metrics.TOKENS: "Tokens, by direction (in: prompt, out: answer).",
    metrics.EMBEDDINGS: "Texts embedded.",
    metrics.EMBED_RETRIES: "Embedding calls retried, by kind of error.",
    metrics.TTFT: "From the start of an attempt to the model's first token.",
    metrics.DURATION: "From the start of an answered attempt to its end.",
}

STATES = tuple(str(state) for state in Health)


def _label_names(series: Sequence[dict[str, Any]]) -> list[str]:
    names: set[str] = set()
    for item in series:
        names.update(item["labels"])
    return sorted(names)


def families(snapshot: dict[str, Any]) -> list[Metric]:
    """A :meth:`Metrics.snapshot` as Prometheus metric families."""
    found: list[Metric] = []
    for name, series in snapshot["counters"].items():
        labels = _label_names(series)
        counter = CounterMetricFamily(
            PREFIX + name, _HELP.get(name, name), labels=labels
        )
        for item in series:
            counter.add_metric(
                [item["labels"].get(label, "") for label in labels], item["value"]
            )
        found.append(counter)
    for name, series in snapshot["histograms"].items():
        labels = _label_names(series)
        histogram = HistogramMetricFamily(
            PREFIX + name, _HELP.get(name, name), labels=labels
        )
        for item in series:
            histogram.add_metric(
                [item["labels"].get(label, "") for label in labels],
                buckets=list(item["buckets"].items()),
                sum_value=item["sum"],
            )
        found.append(histogram)
    return found


async def model_families(gateway: Gateway) -> list[Metric]:
    """Which models there are, on which routes, and the health of each."""
    info = GaugeMetricFamily(
        "janna_gateway_model_info",
        "A configured model (value 1) and the routes it is on.",
        labels=["provider", "model", "routes"],
    )
    health = GaugeMetricFamily(
        "janna_gateway_model_health",
        "Each model's health (healthy, failing, unchecked, warming): 1 for "
        "the one it has, from the Redis health cache health:{provider}:{model}.",
        labels=["provider", "model", "state"],
    )
    refs = gateway.config.models
    cached = await gateway.health.read(refs)
    states: list[tuple[str, str, str, str]] = []
    for ref in refs:
        override = gateway.providers[ref.provider].health_override(ref.model)
        routes = ",".join(
            name for name, chain in gateway.config.routes.items() if ref in chain
        )
        states.append((ref.provider, ref.model, routes, override or str(cached[ref])))
    embedder = gateway.embedder
    states.append((embedder.provider, embedder.model, "embeddings", embedder.health()))
    for provider, model, routes, state in states:
        info.add_metric([provider, model, routes], 1)
        for candidate in STATES:
            health.add_metric([provider, model, candidate], int(candidate == state))
    return [info, health]


def collector(gateway: Gateway, loop: asyncio.AbstractEventLoop) -> LoopCollector:
    """What the gateway process registers with its exporter."""
    stats: Metrics = gateway.metrics

    async def read() -> Sequence[Metric]:
        # The snapshot is taken on the loop, between two of its steps, so it
        # never sees a counter half-updated.
        return [*families(stats.snapshot()), *await model_families(gateway)]

    return LoopCollector("gateway", read, loop)
