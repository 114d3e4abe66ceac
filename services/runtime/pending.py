"""Servicers for calls that a service does not implement yet.

Every method of the given service answers UNIMPLEMENTED with a message that
names the call, so a client learns exactly what is missing instead of
getting grpc's generic "Method not implemented!".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.runtime import errors

logger = logging.getLogger(__name__)


def pending(base: type[Any], descriptor: ServiceDescriptor) -> Any:
    """An instance of ``base`` whose every method is UNIMPLEMENTED."""
    namespace: dict[str, Any] = {}
    for method in descriptor.methods:
        message = f"{descriptor.full_name}/{method.name} is not available yet"
        if method.server_streaming:
            namespace[method.name] = _streaming(message)
        else:
            namespace[method.name] = _unary(message)
    return type(f"Pending{descriptor.name}", (base,), namespace)()


def _unary(message: str) -> Any:
    async def call(
        _self: Any, _request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await errors.abort(context, grpc.StatusCode.UNIMPLEMENTED, message)

    return call


def _streaming(message: str) -> Any:
    async def call(
        _self: Any, _request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await errors.abort(context, grpc.StatusCode.UNIMPLEMENTED, message)
        yield  # pragma: no cover - makes this an async generator

    return call
