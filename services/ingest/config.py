"""Configuration of the ingest service and its worker, read once at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class AwsConfig:
    """Where the attachments' bucket and the ingestion queues are.

    Credentials are not part of it: botocore finds them itself (environment,
    profile, task role), so they never pass through Janna's objects.
    """

    endpoint_url: str | None
    """``AWS_ENDPOINT_URL``: moto or another S3/SQS-compatible server; unset on AWS."""
    region: str
    """``AWS_REGION``, default us-east-1."""
    bucket: str
    """``S3_BUCKET``, default janna-attachments."""
    queue_url: str
    """``SQS_INGESTION_QUEUE_URL``: the queue the worker polls."""
    dlq_url: str
    """``SQS_INGESTION_DLQ_URL``: where SQS moves a message after its last try."""

    @classmethod
    def from_env(cls, env: Env) -> AwsConfig:
        queue_url = env.optional("SQS_INGESTION_QUEUE_URL")
        dlq_url = env.optional("SQS_INGESTION_DLQ_URL")
        if queue_url is None or dlq_url is None:
            raise ConfigError(
                "SQS_INGESTION_QUEUE_URL and SQS_INGESTION_DLQ_URL must be set"
            )
        return cls(
            endpoint_url=env.optional("AWS_ENDPOINT_URL"),
            region=env.text("AWS_REGION", "us-east-1"),
            bucket=env.text("S3_BUCKET", "janna-attachments"),
            queue_url=queue_url,
            dlq_url=dlq_url,
        )


@dataclass(frozen=True)
class UploadConfig:
    """Limits of the upload calls, and how often the service checks the DLQ."""

    max_bytes: int
    """``JANNA_UPLOAD_MAX_BYTES``: largest file by pre-signed upload (50 MiB)."""
    direct_max_bytes: int
    """``JANNA_DIRECT_UPLOAD_MAX_BYTES``: largest direct upload (10 MiB); the
    edge must admit a body this large, see docs/documents.md."""
    url_expiry_s: int
    """``JANNA_UPLOAD_URL_EXPIRY_S``: how long a pre-signed PUT URL is valid."""
    dlq_sweep_s: float = 60.0
    """``JANNA_INGEST_DLQ_SWEEP_S``: how often the service looks in the DLQ for
    attachments still ``processing`` (their worker died on the last try) and
    marks them ``error`` (60)."""

    @classmethod
    def from_env(cls, env: Env) -> UploadConfig:
        config = cls(
            max_bytes=env.integer("JANNA_UPLOAD_MAX_BYTES", 50 * MIB),
            direct_max_bytes=env.integer("JANNA_DIRECT_UPLOAD_MAX_BYTES", 10 * MIB),
            url_expiry_s=env.integer("JANNA_UPLOAD_URL_EXPIRY_S", 900),
            dlq_sweep_s=env.number("JANNA_INGEST_DLQ_SWEEP_S", 60.0),
        )
        if config.max_bytes <= 0 or config.direct_max_bytes <= 0:
            raise ConfigError("upload limits must be positive")
        if config.dlq_sweep_s <= 0:
            raise ConfigError("JANNA_INGEST_DLQ_SWEEP_S must be positive")
        return config


@dataclass(frozen=True)
class WorkerConfig:
    """How the worker polls, parses, chunks, embeds and retries."""

    concurrency: int
    """``JANNA_WORKER_CONCURRENCY``: jobs one worker process runs at once (1);
    run more processes to use more cores."""
    poll_wait_s: int
    """``JANNA_WORKER_POLL_WAIT_S``: SQS long-poll wait, at most 20 (10); a
    stopping worker lets its last poll end, so this bounds its shutdown."""
    visibility_s: int
    """``JANNA_WORKER_VISIBILITY_S``: each extension of a running job's message
    hides it this much longer; renewed at a third of it."""
    max_job_s: float
    """``JANNA_WORKER_MAX_JOB_S``: a job still running after this stops being
    extended and is abandoned, so its message is delivered again."""
    retry_delay_s: int
    """``JANNA_WORKER_RETRY_DELAY_S``: after a failed try the message comes
    back after this many seconds times the tries so far."""
    max_file_bytes: int
    """``JANNA_UPLOAD_MAX_BYTES`` again: a larger object is refused unread."""
    chunk_size: int
    """``JANNA_CHUNK_SIZE``: the most characters in one chunk (1000)."""
    chunk_overlap: int
    """``JANNA_CHUNK_OVERLAP``: characters repeated from the previous chunk of
    the same section (150)."""
    embed_batch: int
    """``JANNA_EMBED_BATCH_SIZE``: texts per gateway Embed call (32)."""
    embed_attempts: int
    """``JANNA_EMBED_ATTEMPTS``: tries per batch when the gateway is busy (5)."""
    embed_backoff_s: float
    """``JANNA_EMBED_BACKOFF_S``: first wait between tries; doubles each time."""
    embed_timeout_s: float
    """``JANNA_EMBED_TIMEOUT_S``: deadline of one Embed call."""
    tmp_dir: Path | None
    """``JANNA_WORKER_TMP_DIR``: where downloads are spooled; the system's
    temporary folder when unset."""
    metrics_port: int = 9106
    """``JANNA_INGEST_WORKER_METRICS_PORT``: the worker's Prometheus port, on
    ``JANNA_METRICS_HOST`` (9106; 0 picks a free one)."""

    @classmethod
    def from_env(cls, env: Env) -> WorkerConfig:
        tmp = env.optional("JANNA_WORKER_TMP_DIR")
        config = cls(
            concurrency=env.integer("JANNA_WORKER_CONCURRENCY", 1),
            poll_wait_s=env.integer("JANNA_WORKER_POLL_WAIT_S", 10),
            visibility_s=env.integer("JANNA_WORKER_VISIBILITY_S", 60),
            max_job_s=env.number("JANNA_WORKER_MAX_JOB_S", 1800.0),
            retry_delay_s=env.integer("JANNA_WORKER_RETRY_DELAY_S", 30),
            max_file_bytes=env.integer("JANNA_UPLOAD_MAX_BYTES", 50 * MIB),
            chunk_size=env.integer("JANNA_CHUNK_SIZE", 1000),
            chunk_overlap=env.integer("JANNA_CHUNK_OVERLAP", 150),
            embed_batch=env.integer("JANNA_EMBED_BATCH_SIZE", 32),
            embed_attempts=env.integer("JANNA_EMBED_ATTEMPTS", 5),
            embed_backoff_s=env.number("JANNA_EMBED_BACKOFF_S", 1.0),
            embed_timeout_s=env.number("JANNA_EMBED_TIMEOUT_S", 60.0),
            tmp_dir=Path(tmp) if tmp else None,
            metrics_port=env.integer("JANNA_INGEST_WORKER_METRICS_PORT", 9106),
        )
        if not 0 <= config.chunk_overlap < config.chunk_size:
            raise ConfigError("JANNA_CHUNK_OVERLAP must be below JANNA_CHUNK_SIZE")
        if not 0 <= config.poll_wait_s <= 20:
            raise ConfigError("JANNA_WORKER_POLL_WAIT_S must be 0 to 20")
        if config.visibility_s < 3 or config.concurrency < 1:
            raise ConfigError(
                "JANNA_WORKER_VISIBILITY_S must be at least 3 and "
                "JANNA_WORKER_CONCURRENCY at least 1"
            )
        if config.embed_batch < 1 or config.embed_attempts < 1:
            raise ConfigError("JANNA_EMBED_BATCH_SIZE and JANNA_EMBED_ATTEMPTS >= 1")
        return config
