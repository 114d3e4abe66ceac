"""gRPC channels from one service to another, with the same options everywhere.

Every call made on such a channel carries the id of the request being served
(``x-request-id``, from :data:`services.runtime.logs.REQUEST_ID`), so that one
request can be followed through every service it reaches without each call
site having to remember to forward it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.runtime import logs

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

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


def with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """``details`` with the current request id added, unless the call has one."""
    request_id = logs.REQUEST_ID.get()
    pairs = list(details.metadata or ())
    if not request_id or any(key == REQUEST_ID_HEADER for key, _ in pairs):
        return details
    metadata = grpc.aio.Metadata(*pairs, (REQUEST_ID_HEADER, request_id))
    replaced: grpc.aio.ClientCallDetails = details._replace(metadata=metadata)
    return replaced


class ForwardRequestId(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds the served request's id to every outgoing call, of every kind."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(with_request_id(client_call_details), request)

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(with_request_id(client_call_details), request)

    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(
            with_request_id(client_call_details), request_iterator
        )

    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(
            with_request_id(client_call_details), request_iterator
        )


def connect(address: str) -> grpc.aio.Channel:
    """An insecure channel to ``address`` (``host:port``) inside the mesh."""
    return grpc.aio.insecure_channel(
        address, options=_OPTIONS, interceptors=[ForwardRequestId()]
    )
