"""gRPC channels from one service to another, with the same options everywhere."""

from __future__ import annotations

import logging

import grpc

logger = logging.getLogger(__name__)

# A peer that restarts must be reachable again within a second or so; gRPC's
# default reconnect backoff grows to two minutes.
_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


def connect(address: str) -> grpc.aio.Channel:
    """An insecure channel to ``address`` (``host:port``) inside the mesh."""
    return grpc.aio.insecure_channel(address, options=_OPTIONS)
