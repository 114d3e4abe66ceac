"""Prometheus metrics: every service serves its own on a loopback HTTP port.

The standard process metrics come with ``prometheus_client``; the RPC
metrics here are recorded by the access-log interceptor for every service,
and each service adds its own next to its code. Figures that live elsewhere
(a table's row counts, a queue's depth, counters the event loop owns) are
read when Prometheus asks, by a :class:`LoopCollector`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

RPC_REQUESTS = Counter(
    "janna_rpc_requests_total",
    "RPCs served, by method and final status code.",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "janna_rpc_duration_seconds",
    "Time from the start of an RPC to its end, streams included.",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


class MetricsServer:
    """The HTTP endpoint Prometheus scrapes (``/metrics``)."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> int:
        """Starts serving; returns the bound port."""
        self._server, self._thread = start_http_server(self._port, self._host)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class LoopCollector(Collector):
    """Metrics read on the service's event loop each time Prometheus scrapes.

    The exporter answers scrapes on its own threads, where the loop's pools,
    clients and counters must not be touched; so the read is handed to the
    loop and awaited for at most ``timeout_s``. A read that is late, or that
    returns None (its source did not answer), serves the figures of the last
    one that succeeded (none before the first); reads closer together than
    ``max_age_s`` share one result, so that eager scrapers cost the source
    nothing more.
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], Awaitable[Sequence[Metric] | None]],
        loop: asyncio.AbstractEventLoop,
        *,
        timeout_s: float = 2.0,
        max_age_s: float = 0.0,
    ) -> None:
        self._name = name
        self._read = read
        self._loop = loop
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last: Sequence[Metric] = ()
        self._read_at: float | None = None

    def describe(self) -> Iterable[Metric]:
        # Without this the registry would collect once while registering, on
        # the loop's own thread, which would wait for itself.
        return ()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._read_at is not None and now - self._read_at < self._max_age_s:
                return self._last
            future = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
            try:
                fresh = future.result(self._timeout_s)
            except TimeoutError:
                future.cancel()
                logger.warning(
                    "%s metrics not read within %.1fs; serving the last ones",
                    self._name,
                    self._timeout_s,
                )
                return self._last
            if fresh is not None:
                self._last = fresh
                self._read_at = time.monotonic()
            return self._last

    async def _run(self) -> Sequence[Metric] | None:
        return await self._read()


def register(collector: Collector) -> Callable[[], None]:
    """Adds ``collector`` to the exported metrics; returns what removes it."""
    REGISTRY.register(collector)
    return lambda: REGISTRY.unregister(collector)
