"""Prometheus metrics: every service serves its own on a loopback HTTP port.

The standard process metrics come with ``prometheus_client``; the RPC
metrics here are recorded by the access-log interceptor for every service,
and each service adds its own next to its code.
"""

from __future__ import annotations

import logging
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, start_http_server

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
