"""Small helpers for reading gateway streams and statuses in tests."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from services.proto.janna.v1 import gateway_pb2


def ask(
    text: str = "Hi", model: str = "", **fields: object
) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[gateway_pb2.ChatMessage(role="user", content=text)],
        model=model,
        **fields,  # type: ignore[arg-type]
    )


async def collect(
    call: grpc.aio.UnaryStreamCall,
) -> tuple[list[gateway_pb2.GenerateEvent], grpc.aio.AioRpcError | None]:
    """Every event of a stream, and the error that ended it, if one did."""
    events: list[gateway_pb2.GenerateEvent] = []
    try:
        async for event in call:
            events.append(event)
    except grpc.aio.AioRpcError as exc:
        return events, exc
    return events, None


def text_of(events: list[gateway_pb2.GenerateEvent]) -> str:
    return "".join(e.delta for e in events if e.WhichOneof("event") == "delta")


def kinds(events: list[gateway_pb2.GenerateEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def _status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    raise AssertionError("no grpc-status-details-bin in the trailers")


def reason(error: grpc.aio.AioRpcError) -> str:
    for detail in _status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the status")


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    for detail in _status(error).details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToTimedelta().total_seconds())
    return None
