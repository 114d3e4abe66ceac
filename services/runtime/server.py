"""Start-up and shutdown of a service's gRPC server, the same for every service.

Each service builds its servicers and hands them to :func:`serve`, which adds
what every service has: ``grpc.health.v1.Health``, server reflection, the
mesh health check, one access-log line per RPC, and an orderly shutdown on
SIGTERM (stop accepting, let in-flight calls finish within the grace period,
close pools, exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.proto.janna.v1 import mesh_pb2, mesh_pb2_grpc
from services.runtime import errors, logs, metrics
from services.runtime.config import ConfigError, Env, ServerConfig
from services.runtime.db import SchemaError
from services.runtime.meshhealth import MeshHealthServicer

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Servicer:
    """One implemented gRPC service and the generated function that adds it."""

    descriptor: ServiceDescriptor
    impl: object
    add: Callable[[Any, grpc.aio.Server], None]


Setup = Callable[[AsyncExitStack], Awaitable[Sequence[Servicer]]]
"""Builds a service's servicers; pushes what must be closed onto the stack."""


def request_id_of(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The request's id: Envoy's ``x-request-id``, else a W3C trace id."""
    values = dict(metadata or ())
    request_id = values.get("x-request-id")
    if isinstance(request_id, str) and request_id:
        return request_id
    traceparent = values.get("traceparent")
    if isinstance(traceparent, str) and traceparent.count("-") == 3:
        return traceparent.split("-")[1]
    return ""


class AccessLog(grpc.aio.ServerInterceptor):
    """Per RPC: the request id for every log line, metrics, one closing line."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        request_id = request_id_of(details.invocation_metadata)
        service = self._service

        def begin() -> float:
            # Each RPC runs in its own task, so this binds the id to its lines.
            logs.REQUEST_ID.set(request_id)
            return time.perf_counter()

        def finish(started: float, status: str) -> None:
            elapsed = time.perf_counter() - started
            metrics.RPC_REQUESTS.labels(service, method, status).inc()
            metrics.RPC_DURATION.labels(service, method).observe(elapsed)
            logger.info("rpc %s %s %.1fms", method, status, elapsed * 1000)

        def status_of(
            context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
        ) -> str:
            code = context.code()
            if code is not None and code != grpc.StatusCode.OK:
                return str(code.name if isinstance(code, grpc.StatusCode) else code)
            if isinstance(exc, asyncio.CancelledError):
                return "CANCELLED"
            if exc is not None:
                return "UNKNOWN"
            return "OK"

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                started = begin()
                try:
                    reply = await inner_unary(request, context)
                except BaseException as exc:
                    finish(started, status_of(context, exc))
                    await _internal_error(context, exc, method)
                    raise
                finish(started, status_of(context, None))
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                started = begin()
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    finish(started, status_of(context, exc))
                    await _internal_error(context, exc, method)
                    raise
                finish(started, status_of(context, None))

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _internal_error(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, method: str
) -> None:
    """Answers a servicer's unexpected exception like any other error.

    gRPC would end the call UNKNOWN with the exception's text as the message,
    which tells a client about the code and nothing it can use; this keeps
    the traceback in the log, beside the request id, and gives the client
    the same status with a plain message, a reason and that id.
    """
    if not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
        return
    logger.error("unexpected error in %s", method, exc_info=exc)
    await errors.abort(context, grpc.StatusCode.UNKNOWN, "internal error", "INTERNAL")


async def serve(config: ServerConfig, setup: Setup) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts it down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as resources:
        servicers = await setup(resources)
        server = grpc.aio.server(
            interceptors=[AccessLog(config.name)],
            # Direct uploads carry up to 10 MiB in one message.
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        mesh = MeshHealthServicer(config)
        resources.push_async_callback(mesh.close)
        mesh_pb2_grpc.add_MeshHealthServicer_to_server(mesh, server)

        names = [mesh_pb2.DESCRIPTOR.services_by_name["MeshHealth"].full_name]
        for servicer in servicers:
            servicer.add(servicer.impl, server)
            names.append(servicer.descriptor.full_name)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )

        address = f"{config.host}:{config.port}"
        if server.add_insecure_port(address) == 0:
            raise OSError(f"{config.name}: cannot listen on {address}")
        await server.start()
        exporter = metrics.MetricsServer(config.metrics_host, config.metrics_port)
        metrics_port = exporter.start()
        resources.callback(exporter.stop)
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "%s listening on %s; metrics on %s:%s",
            config.name,
            address,
            config.metrics_host,
            metrics_port,
        )

        await stop.wait()
        logger.info(
            "%s stopping; in-flight calls have %.0fs", config.name, config.grace_s
        )
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
    logger.info("%s stopped", config.name)


def main(name: str, build: Callable[[Env], tuple[ServerConfig, Setup]]) -> int:
    """The body of a service's ``main``: configure, serve, exit 0.

    A configuration, schema or port problem at start-up ends the process with
    status 1 and one clear line instead of a traceback.
    """
    env = Env()
    try:
        logs.configure(name, env)
        config, setup = build(env)
        asyncio.run(serve(config, setup))
    except (ConfigError, SchemaError, OSError) as exc:
        logger.error("%s cannot start: %s", name, exc)
        return 1
    return 0
