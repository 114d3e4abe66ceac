"""The one way a service answers with an error: a gRPC status with a stable reason.

The edge renders a status as JSON (``{"code", "message", "details"}``); the
``google.rpc.ErrorInfo`` detail carries a stable, machine-readable reason
beside the human message, so clients never parse messages, and the id of the
request (``metadata.requestId``), so that a user who reports an error hands
the operator the id to grep the logs for.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from services.runtime import logs

logger = logging.getLogger(__name__)

DOMAIN = "janna"

REQUEST_ID_KEY = "requestId"
"""The ErrorInfo metadata key that carries the request's id."""


def status_details(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *extra: object,
) -> bytes:
    """Serialises a ``google.rpc.Status`` with an ErrorInfo and optional details."""
    request_id = logs.REQUEST_ID.get()
    info = error_details_pb2.ErrorInfo(
        reason=reason,
        domain=DOMAIN,
        metadata={REQUEST_ID_KEY: request_id} if request_id else None,
    )
    details = [info, *extra]
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    serialized: bytes = status.SerializeToString()
    return serialized


async def abort(
    context: grpc.aio.ServicerContext[object, object],
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    *extra: object,
    metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    """Ends the call with ``code``; ``reason`` defaults to the code's name.

    ``metadata`` rides along as trailers, which the edge turns into response
    headers (``retry-after``, for one).
    """
    details = status_details(code, message, reason or code.name, *extra)
    await context.abort(
        code,
        message,
        trailing_metadata=(*metadata, ("grpc-status-details-bin", details)),
    )
    raise AssertionError("unreachable: context.abort raises")
