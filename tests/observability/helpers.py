"""Helpers of the observability tests: reading a service's metrics, the admin view."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from devstack.stack import Stack
from services.runtime.scrape import Scraped, parse

ADMIN = {"Authorization": "Bearer dev:admin:admin@dev.local"}


def bearer(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer dev:{user}:{user}@dev.local"}


def new_user() -> str:
    return f"obs-{uuid.uuid4().hex[:10]}"


async def metrics_of(port: int) -> Scraped:
    """One Prometheus endpoint's samples."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        reply = await http.get(f"http://127.0.0.1:{port}/metrics")
    reply.raise_for_status()
    return Scraped(samples=tuple(parse(reply.text)), answered=1, targets=1)


async def service_metrics(stack: Stack, name: str) -> Scraped:
    return await metrics_of(stack.metrics_ports[name])


async def admin_view(client: httpx.AsyncClient) -> dict[str, Any]:
    reply = await client.get("/api/admin/metrics", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    view: dict[str, Any] = reply.json()
    return view
