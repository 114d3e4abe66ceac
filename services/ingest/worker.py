"""``python -m services.ingest.worker``: the ingestion queue's worker process.

Each message names one attachment. A job streams the object from S3 into a
temporary file (hashing it on the way), reuses the chunks of an earlier
upload of the same bytes by the same user when there is one, and otherwise
parses the file, chunks it, embeds the chunks through the gateway and
writes them, replacing any from an earlier try, in one transaction that
also marks the attachment ready. Only then is the message deleted.

While a job runs its message's visibility is extended, so a long job is
not handed to another worker; a worker that dies stops extending it and
the message comes back. What a failure does (the runbook's table):

=============================  ==============================================
file gone from S3 (NoSuchKey)  attachment ``error`` "file missing"; message
                               deleted
corrupt or unreadable file     ``error`` with a reason for the user; deleted
embedding 429 / unavailable    retried with backoff inside the job; if it
                               persists the message is left, and comes back
                               after ``JANNA_WORKER_RETRY_DELAY_S`` x tries
anything else (a bug, the      as above: logged, message left for another try
database down)
last try fails                 ``error`` naming the cause; the message is
                               left, and SQS moves it to the DLQ on its next
                               receive (redrive policy, 3 receives)
=============================  ==============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.ingest import chunking, files, metrics, parsing, store
from services.ingest.aws import AWS_ERRORS, Aws, Message, ObjectMissing, ObjectTooLarge
from services.ingest.config import AwsConfig, WorkerConfig
from services.ingest.embedding import Embedder, EmbeddingFailed
from services.runtime import channels, db, logs
from services.runtime.config import ConfigError, DatabaseConfig, Env, ServerConfig
from services.runtime.db import SchemaError
from services.runtime.identity import Caller
from services.runtime.metrics import MetricsServer

logger = logging.getLogger(__name__)

_MAX_VISIBILITY_S = 12 * 60 * 60
"""SQS's ceiling for a message's visibility timeout."""


class Permanent(Exception):
    """The job cannot succeed, however often it is tried: the attachment is an
    ``error`` with this message (meant for its owner) and the message goes."""


@dataclass(frozen=True)
class Job:
    message: Message
    attachment_id: uuid.UUID


class Worker:
    """Polls the queue and runs up to ``concurrency`` jobs at once."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        aws: Aws,
        embedder: Embedder,
        config: WorkerConfig,
        max_receives: int | None,
    ) -> None:
        self._pool = pool
        self._aws = aws
        self._embedder = embedder
        self._config = config
        self._max_receives = max_receives
        self._queue = aws.config.queue_url

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Works until ``stop`` is set, then gives running jobs ``grace_s``."""
        running: set[asyncio.Task[None]] = set()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                free = self._config.concurrency - len(running)
                if free <= 0:
                    await asyncio.wait(
                        [*running, stopping], return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                messages = await self._receive(free, stopping)
                for message in messages:
                    task = asyncio.create_task(self.handle(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            stopping.cancel()
            if running:
                logger.info("waiting up to %.0fs for %d jobs", grace_s, len(running))
                _, late = await asyncio.wait(running, timeout=grace_s)
                for task in late:
                    # Its message comes back after its visibility timeout.
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def _receive(self, count: int, stopping: asyncio.Task[bool]) -> list[Message]:
        polling = asyncio.create_task(
            self._aws.receive(
                self._queue,
                count,
                self._config.poll_wait_s,
                visibility_s=self._config.visibility_s,
            )
        )
        await asyncio.wait([polling, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not polling.done():
            # A long poll abandoned by the client still takes a message that
            # arrives meanwhile, hiding it for a whole visibility timeout; so
            # the poll is let finish and what it got is handed back at once.
            await asyncio.wait([polling], timeout=self._config.poll_wait_s + 5)
            if not polling.done():
                polling.cancel()
            with contextlib.suppress(asyncio.CancelledError, *AWS_ERRORS):
                for message in polling.result():
                    await self._aws.extend(self._queue, message.receipt_handle, 0)
            return []
        try:
            return polling.result()
        except AWS_ERRORS as exc:
            logger.warning("receiving from the queue failed: %s", exc)
            await asyncio.sleep(2.0)
            return []

    async def handle(self, message: Message) -> None:
        """One delivery, start to end; never raises."""
        # Each delivery runs in its own task: its lines, and its calls to the
        # gateway, carry the id of the upload request that queued it.
        logs.REQUEST_ID.set(message.request_id)
        began = time.monotonic()
        job = self._job(message)
        if job is None:
            logger.warning("dropping malformed message %s", message.message_id)
            await self._delete(message)
            metrics.job_ended("malformed", time.monotonic() - began)
            return
        deadline = asyncio.timeout(self._config.max_job_s)
        try:
            async with self._extended(message), deadline:
                outcome = await self._process(job)
        except Permanent as exc:
            logger.info("attachment %s failed: %s", job.attachment_id, exc)
            await self._fail(job, str(exc))
            await self._delete(message)
            metrics.job_ended("failed", time.monotonic() - began)
            return
        except Exception as exc:
            # Whatever else went wrong, this try failed and a later one may not.
            if deadline.expired():
                reason = f"processing took longer than {self._config.max_job_s:.0f}s"
            elif isinstance(exc, EmbeddingFailed):
                reason = str(exc)
            elif isinstance(exc, AWS_ERRORS):
                reason = "file storage was unavailable"
            elif isinstance(exc, _DATABASE_ERRORS):
                reason = "the database was unavailable"
            else:
                logger.exception("attachment %s: unexpected error", job.attachment_id)
                reason = "an internal error occurred"
            last = await self._retry_later(job, reason, exc)
            outcome = "dead_lettered" if last else "retried"
            metrics.job_ended(outcome, time.monotonic() - began)
            return
        logger.info(
            "attachment %s done in %.1fs", job.attachment_id, time.monotonic() - began
        )
        await self._delete(message)
        metrics.job_ended(outcome, time.monotonic() - began)

    def _job(self, message: Message) -> Job | None:
        try:
            body = json.loads(message.body)
        except ValueError:
            return None
        raw = body.get("attachmentId") if isinstance(body, dict) else None
        parsed = store.parse_id(raw) if isinstance(raw, str) else None
        return None if parsed is None else Job(message, parsed)

    @contextlib.asynccontextmanager
    async def _extended(self, message: Message) -> AsyncIterator[None]:
        """Keeps the message hidden from other workers while the job runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._config.visibility_s / 3)
                try:
                    await self._aws.extend(
                        self._queue, message.receipt_handle, self._config.visibility_s
                    )
                except AWS_ERRORS as exc:
                    logger.warning("extending %s failed: %s", message.message_id, exc)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _process(self, job: Job) -> str:
        """Ingests the attachment; returns ready, reused or nothing (no work)."""
        async with self._pool.acquire() as conn, conn.transaction():
            # The message is sent inside the transaction that marks the
            # attachment processing; the lock waits for that to commit.
            attachment = await store.lock(conn, job.attachment_id)
            if attachment is None or attachment.status in ("ready", "uploading"):
                # Deleted, done by an earlier delivery, or its completion
                # rolled back: nothing to do.
                logger.info("attachment %s needs no work", job.attachment_id)
                return "nothing"
            await store.record_attempt(conn, attachment.id, job.message.receive_count)
        kind = files.type_of_mime(attachment.content_type)
        if kind is None:
            raise Permanent(f"files of type {attachment.content_type} cannot be read")

        with tempfile.NamedTemporaryFile(
            dir=self._config.tmp_dir, prefix="janna-", suffix=f".{kind.kind}"
        ) as spool:
            try:
                download = await self._aws.download(
                    attachment.s3_key, spool, self._config.max_file_bytes
                )
            except ObjectMissing as exc:
                raise Permanent("file missing") from exc
            except ObjectTooLarge as exc:
                raise Permanent("the file is larger than uploads may be") from exc
            if await self._reuse(attachment, download.sha256):
                return "reused"
            parse_began = time.monotonic()
            try:
                parsed = await _in_daemon_thread(
                    parsing.parse, Path(spool.name), kind.kind
                )
            except parsing.DocumentError as exc:
                raise Permanent(str(exc)) from exc

        chunks = chunking.chunk(
            parsed.elements, self._config.chunk_size, self._config.chunk_overlap
        )
        embed_began = time.monotonic()
        owner = Caller(user_id=attachment.user_id, email="", groups=())
        vectors = await self._embedder.embed([c.text for c in chunks], owner.metadata())
        rows = [
            store.NewChunk(index=c.index, page=c.page, content=c.text, embedding=v)
            for c, v in zip(chunks, vectors, strict=True)
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await store.lock(conn, attachment.id)
            if locked is None:
                logger.info("attachment %s deleted during its job", attachment.id)
                return "nothing"
            await store.replace_chunks(
                conn, locked, rows, parsed.pages, download.sha256
            )
        logger.info(
            "attachment %s ready: %d chunks, %d pages; parsed in %.1fs, "
            "embedded in %.1fs",
            attachment.id,
            len(rows),
            parsed.pages,
            embed_began - parse_began,
            time.monotonic() - embed_began,
        )
        metrics.document_ingested(
            parsed.pages, len(rows), time.monotonic() - parse_began
        )
        return "ready"

    async def _reuse(self, attachment: store.Attachment, content_hash: str) -> bool:
        """Copies the chunks of the same user's earlier upload of the same bytes."""
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await store.lock(conn, attachment.id)
            if locked is None:
                return True
            source = await store.reusable(
                conn, attachment.user_id, content_hash, attachment.id
            )
            if source is None:
                return False
            count = await store.copy_chunks(conn, locked, source, content_hash)
        logger.info(
            "attachment %s reuses %d chunks of %s (same bytes)",
            attachment.id,
            count,
            source.id,
        )
        return True

    async def _retry_later(self, job: Job, reason: str, exc: BaseException) -> bool:
        """Records the failed try; True when it was the last one."""
        tries = job.message.receive_count
        last = self._max_receives is not None and tries >= self._max_receives
        logger.warning(
            "attachment %s try %d failed (%s: %s)%s",
            job.attachment_id,
            tries,
            type(exc).__name__,
            exc,
            "; last try, the queue dead-letters it" if last else "",
        )
        try:
            async with self._pool.acquire() as conn:
                if last:
                    await store.fail(
                        conn,
                        job.attachment_id,
                        f"processing failed {tries} times: {reason}. "
                        "An administrator can retry it from the dead-letter queue.",
                    )
                else:
                    await store.note_retry(
                        conn, job.attachment_id, f"try {tries} failed: {reason}"
                    )
        except _DATABASE_ERRORS as db_exc:
            logger.warning("recording the failure failed: %s", db_exc)
        delay = min(self._config.retry_delay_s * tries, _MAX_VISIBILITY_S)
        try:
            await self._aws.extend(self._queue, job.message.receipt_handle, delay)
        except AWS_ERRORS as aws_exc:
            logger.warning(
                "rescheduling %s failed: %s", job.message.message_id, aws_exc
            )
        return last

    async def _fail(self, job: Job, reason: str) -> None:
        try:
            async with self._pool.acquire() as conn:
                await store.fail(conn, job.attachment_id, reason)
        except _DATABASE_ERRORS as exc:
            logger.warning("recording the failure failed: %s", exc)

    async def _delete(self, message: Message) -> None:
        try:
            await self._aws.delete_message(self._queue, message.receipt_handle)
        except AWS_ERRORS as exc:
            # The message comes back; the job finds its attachment done.
            logger.warning("deleting %s failed: %s", message.message_id, exc)


async def _in_daemon_thread(
    function: Callable[[Path, str], parsing.Parsed], path: Path, kind: str
) -> parsing.Parsed:
    """Runs a parse in a daemon thread.

    Unlike ``asyncio.to_thread``, whose pool is joined at exit, an abandoned
    parse (a job past its grace at shutdown, or past its deadline) does not
    keep the stopping process alive.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[parsing.Parsed] = loop.create_future()

    def settle(result: parsing.Parsed | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def work() -> None:
        try:
            result, error = function(path, kind), None
        except Exception as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="parse", daemon=True).start()
    return await future


_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
)


def _user_reason(exc: BaseException) -> str:
    if isinstance(exc, EmbeddingFailed):
        return str(exc)
    if isinstance(exc, AWS_ERRORS):
        return "file storage was unavailable"
    return "the database was unavailable"


async def run(
    server: ServerConfig,
    database: DatabaseConfig,
    aws_config: AwsConfig,
    config: WorkerConfig,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await asyncio.to_thread(parsing.prepare)
    async with AsyncExitStack() as resources:
        exporter = MetricsServer(server.metrics_host, config.metrics_port)
        metrics_port = exporter.start()
        resources.callback(exporter.stop)
        pool = await db.connect(database)
        resources.push_async_callback(pool.close)
        aws = await resources.enter_async_context(Aws.connect(aws_config))
        channel = channels.connect(server.peers["gateway"])
        resources.push_async_callback(channel.close)
        max_receives = await aws.max_receive_count(aws_config.queue_url)
        worker = Worker(
            pool,
            aws,
            Embedder(channel, config, database.embedding_dim),
            config,
            max_receives,
        )
        logger.info(
            "worker polling %s (dead-letters after %s receives, %d at a time); "
            "metrics on %s:%s",
            aws_config.queue_url.rsplit("/", 1)[-1],
            max_receives or "no",
            config.concurrency,
            server.metrics_host,
            metrics_port,
        )
        await worker.run(stop, server.grace_s)
    logger.info("worker stopped")


def main() -> int:
    env = Env()
    logs.configure("ingest-worker", env)
    try:
        server = ServerConfig.from_env("ingest", env)
        database = DatabaseConfig.from_env(env)
        aws_config = AwsConfig.from_env(env)
        config = WorkerConfig.from_env(env)
        asyncio.run(run(server, database, aws_config, config))
    except (ConfigError, SchemaError, parsing.ParserUnavailable, OSError) as exc:
        logger.error("ingest worker cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
