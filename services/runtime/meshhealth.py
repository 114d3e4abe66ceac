"""The mesh health check that every service serves (``GET /health`` at the edge).

The edge sends ``/health`` to any live service; that service asks every peer's
``grpc.health.v1.Health`` and reports each one's state, answering UNAVAILABLE,
with the report in the status details, when any of them is not serving.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.proto.janna.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
)
from services.runtime import channels, errors
from services.runtime.config import ServerConfig

logger = logging.getLogger(__name__)

PEER_TIMEOUT_S = 1.0


async def warming_models(channel: grpc.aio.Channel) -> list[str]:
    """The gateway's models still loading, as ``provider:model``; none when the
    gateway does not answer (its state says so)."""
    try:
        reply = await gateway_pb2_grpc.ModelGatewayStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), timeout=PEER_TIMEOUT_S
        )
    except grpc.aio.AioRpcError:
        return []
    return [f"{m.provider}:{m.model}" for m in reply.models if m.health == "warming"]


class MeshHealthServicer(mesh_pb2_grpc.MeshHealthServicer):
    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, peer: str) -> grpc.aio.Channel:
        channel = self._channels.get(peer)
        if channel is None:
            channel = channels.connect(self._config.peers[peer])
            self._channels[peer] = channel
        return channel

    async def _state(self, peer: str) -> str:
        if peer == self._config.name:
            return "SERVING"
        stub = health_pb2_grpc.HealthStub(self._channel(peer))
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(),
                timeout=PEER_TIMEOUT_S,
                # A peer that just restarted is still being reconnected to.
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("peer %s health check failed: %s", peer, exc.code())
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def _service(self, peer: str) -> mesh_pb2.ServiceState:
        state = await self._state(peer)
        detail = ""
        # Only a gateway that answers is asked what it is still loading.
        if peer == "gateway" and state == "SERVING":
            found = await warming_models(self._channel(peer))
            detail = f"warming: {', '.join(found)}" if found else ""
        return mesh_pb2.ServiceState(service=peer, state=state, detail=detail)

    async def Check(
        self,
        request: mesh_pb2.MeshHealthRequest,
        context: grpc.aio.ServicerContext[
            mesh_pb2.MeshHealthRequest, mesh_pb2.MeshHealthReport
        ],
    ) -> mesh_pb2.MeshHealthReport:
        services = await asyncio.gather(*(self._service(p) for p in self._config.peers))
        report = mesh_pb2.MeshHealthReport(
            services=services,
            down=[s.service for s in services if s.state != "SERVING"],
        )
        if report.down:
            report.status = "degraded"
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"unavailable: {', '.join(report.down)}",
                "SERVICE_DOWN",
                report,
            )
        report.status = "ok"
        return report

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))
