"""What ingestion counts: queues and attachments (ingest service), jobs (worker).

The ingest service reads the depth of the ingestion queue and of its
dead-letter queue from SQS, and the attachments by status from its own
table, when Prometheus asks (at most once per ``max_age_s``). Each worker
process counts its own jobs on its own endpoint
(``JANNA_INGEST_WORKER_METRICS_PORT``, default 9106): how each delivery
ended, how long it took, and the pages it parsed, whose rate is the pages
per second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.ingest.aws import AWS_ERRORS, Aws
from services.runtime.metrics import LoopCollector

logger = logging.getLogger(__name__)

STATUSES = ("uploading", "processing", "ready", "error")

JOBS = Counter(
    "janna_ingest_jobs_total",
    "Deliveries of ingestion messages, by how they ended: ready (parsed, "
    "chunked, embedded), reused (the same bytes were ingested before), "
    "nothing (already done or deleted), failed (a permanent error), retried "
    "(left for another try), dead_lettered (the last try failed; SQS moves "
    "the message to the DLQ at its next receive), malformed.",
    ["outcome"],
)
JOB_DURATION = Histogram(
    "janna_ingest_job_duration_seconds",
    "From a delivery's start to its end, by outcome.",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
PAGES = Counter(
    "janna_ingest_pages_total",
    "Pages of the documents ingested; its rate is the pages per second.",
)
CHUNKS = Counter("janna_ingest_chunks_total", "Chunks written.")
PAGES_PER_SECOND = Histogram(
    "janna_ingest_job_pages_per_second",
    "Each ingested document's pages over the time parsing and embedding took.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100),
)

_BY_STATUS = "SELECT status, count(*) AS n FROM attachments GROUP BY status"

DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def job_ended(outcome: str, seconds: float) -> None:
    JOBS.labels(outcome).inc()
    JOB_DURATION.labels(outcome).observe(seconds)


def document_ingested(pages: int, chunks: int, seconds: float) -> None:
    PAGES.inc(pages)
    CHUNKS.inc(chunks)
    if pages and seconds > 0:
        PAGES_PER_SECOND.observe(pages / seconds)


def queues_and_attachments(
    pool: asyncpg.Pool, aws: Aws, loop: asyncio.AbstractEventLoop
) -> LoopCollector:
    """``janna_ingest_queue_depth``, ``..._queue_in_flight`` and
    ``janna_ingest_attachments``; each left out while its source is away."""

    async def read() -> Sequence[Metric] | None:
        found: list[Metric] = []
        depth = GaugeMetricFamily(
            "janna_ingest_queue_depth",
            "Messages waiting in a queue (ingestion, dlq), as SQS approximates.",
            labels=["queue"],
        )
        in_flight = GaugeMetricFamily(
            "janna_ingest_queue_in_flight",
            "Messages of a queue received and not yet deleted (being worked on).",
            labels=["queue"],
        )
        try:
            for name, url in (
                ("ingestion", aws.config.queue_url),
                ("dlq", aws.config.dlq_url),
            ):
                visible, hidden = await aws.depth(url)
                depth.add_metric([name], visible)
                in_flight.add_metric([name], hidden)
        except AWS_ERRORS as exc:
            logger.warning("queue depths not read: %s", exc)
        else:
            found += [depth, in_flight]

        try:
            rows = await pool.fetch(_BY_STATUS)
        except DATABASE_ERRORS as exc:
            logger.warning("attachment counts not read: %s", exc)
        else:
            counts = {row["status"]: row["n"] for row in rows}
            attachments = GaugeMetricFamily(
                "janna_ingest_attachments",
                "Attachments, by status.",
                labels=["status"],
            )
            for status in STATUSES:
                attachments.add_metric([status], counts.get(status, 0))
            found.append(attachments)
        return found or None

    return LoopCollector("ingestion", read, loop, max_age_s=2.0)
