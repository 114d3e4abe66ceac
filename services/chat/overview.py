"""``GET /api/admin/metrics``: the whole mesh at a glance, gathered by the chat service.

Each service already publishes its figures on its Prometheus endpoint, so the
view reads those endpoints (every replica listed in ``JANNA_{NAME}_METRICS_ADDR``,
at once, each given ``JANNA_METRICS_SCRAPE_TIMEOUT_S``) instead of asking
every service for a second copy over gRPC; the services keep their own
tables, and the figures an operator sees here are the ones Prometheus sees.
The chat section comes from the per-minute window in Redis
(:mod:`services.chat.window`), because "the last five minutes" must count
every replica's turns. A section whose source does not answer is
``{"available": false}``; the call itself never fails for it.

Counters and histograms read from an endpoint count since that replica
started, and are added up over the replicas that answered; gauges of shared
state (users, queue depths, attachments) are read from one replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
import httpx
from google.protobuf import struct_pb2

from services.chat.window import TurnWindow, WindowUnavailable
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc
from services.runtime import identity
from services.runtime.scrape import Scraped, quantile, scrape

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Section: TypeAlias = dict[str, Any]

UNAVAILABLE: Section = {"available": False}

WORKERS = "ingest-worker"
"""The key of the ingest workers' endpoints (``JANNA_INGEST_WORKER_METRICS_ADDR``)."""

WINDOWS = (("last5Minutes", 5), ("lastHour", 60))
"""The chat section's windows: name and minutes."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _replicas(scraped: Scraped) -> Section:
    if scraped.targets <= 1:
        return {}
    return {"replicas": {"answered": scraped.answered, "of": scraped.targets}}


def users_section(scraped: Scraped | None) -> Section:
    """Users, from the auth service, which owns their table."""
    total = None if scraped is None else scraped.shared("janna_auth_users")
    if scraped is None or total is None:
        return dict(UNAVAILABLE)
    return {
        "available": True,
        "total": int(total),
        "activeLastDay": _int(scraped.shared("janna_auth_users_active_last_day")),
        "disabled": _int(scraped.shared("janna_auth_users_disabled")),
        **_replicas(scraped),
    }


def gateway_section(scraped: Scraped | None) -> Section:
    """Per provider and model: requests, errors, fallbacks, tokens, health."""
    if scraped is None:
        return dict(UNAVAILABLE)
    pairs: set[tuple[str, str]] = set()
    for name in (
        "janna_gateway_model_info",
        "janna_gateway_requests_total",
        "janna_gateway_errors_total",
    ):
        for sample in scraped.matching(name):
            pairs.add(
                (sample.labels.get("provider", ""), sample.labels.get("model", ""))
            )

    models = []
    for provider, model in sorted(pairs):
        labels = {"provider": provider, "model": model}
        errors_by_kind = {
            kind: int(scraped.total("janna_gateway_errors_total", kind=kind, **labels))
            for kind in scraped.label_values("janna_gateway_errors_total", "kind")
        }
        health = next(
            (
                s.labels.get("state")
                for s in scraped.matching("janna_gateway_model_health", **labels)
                if s.value == 1
            ),
            None,
        )
        routes = next(
            (
                s.labels.get("routes", "")
                for s in scraped.matching("janna_gateway_model_info", **labels)
            ),
            "",
        )
        ttft = scraped.buckets("janna_gateway_time_to_first_token_seconds", **labels)
        models.append(
            {
                "provider": provider,
                "model": model,
                "routes": [r for r in routes.split(",") if r],
                "health": health,
                "requests": int(
                    scraped.total("janna_gateway_requests_total", **labels)
                ),
                "answered": int(
                    scraped.total(
                        "janna_gateway_requests_total", outcome="ok", **labels
                    )
                ),
                "errors": sum(errors_by_kind.values()),
                "errorsByKind": {k: v for k, v in errors_by_kind.items() if v},
                "fallbacks": int(
                    scraped.total("janna_gateway_fallbacks_total", **labels)
                ),
                "tokensIn": int(
                    scraped.total(
                        "janna_gateway_tokens_total", direction="in", **labels
                    )
                ),
                "tokensOut": int(
                    scraped.total(
                        "janna_gateway_tokens_total", direction="out", **labels
                    )
                ),
                "ttftP50Ms": _ms(quantile(0.5, ttft)),
                "ttftP95Ms": _ms(quantile(0.95, ttft)),
            }
        )
    return {
        "available": True,
        "since": "start",
        "models": models,
        "fallbacks": int(scraped.total("janna_gateway_fallbacks_total")),
        "unanswered": int(scraped.total("janna_gateway_unanswered_total")),
        **_replicas(scraped),
    }


def ingestion_section(scraped: Scraped | None) -> Section:
    """The queue, the dead-letter queue and the attachments by status."""
    if scraped is None:
        return dict(UNAVAILABLE)
    statuses = scraped.label_values("janna_ingest_attachments", "status")
    return {
        "available": True,
        "queueDepth": _int(
            scraped.shared("janna_ingest_queue_depth", queue="ingestion")
        ),
        "queueInFlight": _int(
            scraped.shared("janna_ingest_queue_in_flight", queue="ingestion")
        ),
        "dlqDepth": _int(scraped.shared("janna_ingest_queue_depth", queue="dlq")),
        "attachments": {
            status: _int(scraped.shared("janna_ingest_attachments", status=status))
            for status in statuses
        },
        **_replicas(scraped),
    }


def workers_section(scraped: Scraped | None) -> Section:
    """The ingest workers' jobs, by outcome, and their pages."""
    if scraped is None:
        return dict(UNAVAILABLE)
    duration = scraped.buckets("janna_ingest_job_duration_seconds")
    return {
        "available": True,
        "since": "start",
        "jobs": {
            outcome: int(scraped.total("janna_ingest_jobs_total", outcome=outcome))
            for outcome in scraped.label_values("janna_ingest_jobs_total", "outcome")
        },
        "pages": int(scraped.total("janna_ingest_pages_total")),
        "jobP50Ms": _ms(quantile(0.5, duration)),
        "jobP95Ms": _ms(quantile(0.95, duration)),
        **_replicas(scraped),
    }


def retrieval_section(scraped: Scraped | None) -> Section:
    """Searches, results returned and latency percentiles."""
    if scraped is None:
        return dict(UNAVAILABLE)
    latency = scraped.buckets("janna_rag_search_duration_seconds")
    return {
        "available": True,
        "since": "start",
        "searches": int(scraped.total("janna_rag_search_duration_seconds_count")),
        "results": int(scraped.total("janna_rag_search_results_sum")),
        "p50Ms": _ms(quantile(0.5, latency)),
        "p95Ms": _ms(quantile(0.95, latency)),
        **_replicas(scraped),
    }


class MetricsAdminServicer(admin_pb2_grpc.MetricsAdminServicer):
    def __init__(
        self,
        window: TurnWindow,
        http: httpx.AsyncClient,
        targets: Mapping[str, tuple[str, ...]],
        timeout_s: float,
    ) -> None:
        self._window = window
        self._http = http
        self._targets = targets
        self._timeout_s = timeout_s

    async def _scrape(self, name: str) -> Scraped | None:
        targets = self._targets.get(name, ())
        if not targets:
            return None
        scraped = await scrape(self._http, targets, self._timeout_s)
        if scraped is None:
            logger.warning("admin metrics: %s did not answer", name)
        return scraped

    async def _chat(self) -> Section:
        section: Section = {"available": True}
        for label, minutes in WINDOWS:
            try:
                totals = await self._window.read(minutes)
            except WindowUnavailable as exc:
                logger.warning("admin metrics: chat window unreadable: %s", exc)
                return dict(UNAVAILABLE)
            section[label] = {
                "turns": totals.turns,
                "errors": totals.errors,
                "stopped": totals.stopped,
                "rateLimited": totals.rate_limited,
                "ttftP50Ms": totals.ttft_quantile_ms(0.5),
                "ttftP95Ms": totals.ttft_quantile_ms(0.95),
            }
        return section

    async def GetMetrics(
        self, request: admin_pb2.GetMetricsRequest, context: Context
    ) -> struct_pb2.Struct:
        await identity.admin(context)
        auth, gateway, ingest, workers, rag, chat = await asyncio.gather(
            self._scrape("auth"),
            self._scrape("gateway"),
            self._scrape("ingest"),
            self._scrape(WORKERS),
            self._scrape("rag"),
            self._chat(),
        )
        sections: Section = {
            "generatedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "users": users_section(auth),
            "chat": chat,
            "gateway": gateway_section(gateway),
            "ingestion": ingestion_section(ingest),
            "retrieval": retrieval_section(rag),
        }
        if self._targets.get(WORKERS):
            # Workers have no address of their own to derive one from: the
            # section is there when their endpoints are listed.
            sections["ingestWorkers"] = workers_section(workers)
        view = struct_pb2.Struct()
        view.update(sections)
        return view
