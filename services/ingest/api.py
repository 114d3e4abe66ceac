"""The ingest service's calls: attachments (IngestService) and the DLQ (QueueAdmin).

Every call's errors are translated in one place, :func:`_translated`: a
rejected upload is INVALID_ARGUMENT (400) with a stable reason, another
user's attachment is NOT_FOUND exactly like a missing one (404, so ids
cannot be probed), an upload not yet in the bucket is FAILED_PRECONDITION,
and an unreachable database, bucket or queue is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import asyncpg
import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from services.ingest import files, store
from services.ingest.aws import AWS_ERRORS, Aws, Message
from services.ingest.config import UploadConfig
from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
)
from services.runtime import errors, identity, logs

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
DLQ_PEEK_MAX = 100
REDRIVE_MAX = 1000

INGEST_DESCRIPTOR = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Reply = TypeVar("Reply")
Method = Callable[[Any, Any, Context], Awaitable[Reply]]

DATABASE_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    OSError,
)


class NotFound(LookupError):
    """No attachment of the caller's has this id."""


class NotUploaded(RuntimeError):
    """Completion was asked before the object arrived whole."""


def _translated(method: Method[Reply]) -> Method[Reply]:
    """The service's one error boundary: lower errors become gRPC statuses."""

    @functools.wraps(method)
    async def call(self: Any, request: Any, context: Context) -> Reply:
        try:
            return await method(self, request, context)
        except files.UploadRejected as exc:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason
            )
        except NotFound:
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, "attachment not found"
            )
        except NotUploaded as exc:
            await errors.abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "NOT_UPLOADED"
            )
        except DATABASE_ERRORS as exc:
            logger.warning("database unavailable: %s", type(exc).__name__)
            await errors.abort(
                context, grpc.StatusCode.UNAVAILABLE, "the database is unavailable"
            )
        except AWS_ERRORS as exc:
            logger.warning("object storage or queue failed: %s", exc)
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "file storage is unavailable, try again shortly",
            )

    return call


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def to_proto(attachment: store.Attachment) -> ingest_pb2.Attachment:
    return ingest_pb2.Attachment(
        id=str(attachment.id),
        filename=attachment.filename,
        content_type=attachment.content_type,
        size_bytes=attachment.size_bytes,
        status=attachment.status,
        error=attachment.error,
        chunk_count=attachment.chunk_count,
        page_count=attachment.page_count,
        conversation_id=str(attachment.conversation_id or ""),
        created_at=_timestamp(attachment.created_at),
        updated_at=_timestamp(attachment.updated_at),
    )


def job_body(attachment: store.Attachment) -> str:
    """The ingestion message: the attachment to process, and whose it is."""
    body = {"attachmentId": str(attachment.id), "userId": attachment.user_id}
    return json.dumps(body)


def _conversation(raw: str) -> uuid.UUID | None:
    if not raw:
        return None
    parsed = store.parse_id(raw)
    if parsed is None:
        raise files.UploadRejected("conversationId is not a valid id", "BAD_ID")
    return parsed


def _encode_cursor(attachment: store.Attachment) -> str:
    raw = f"{attachment.created_at.isoformat()}|{attachment.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(token: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        moment, _, raw_id = base64.urlsafe_b64decode(token).decode().partition("|")
        return datetime.fromisoformat(moment), uuid.UUID(raw_id)
    except (ValueError, binascii.Error) as exc:
        raise files.UploadRejected("pageToken is not valid", "BAD_PAGE_TOKEN") from exc


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Attachments: upload to S3, status, listing and deletion."""

    def __init__(self, pool: asyncpg.Pool, aws: Aws, config: UploadConfig) -> None:
        self._pool = pool
        self._aws = aws
        self._config = config

    async def _new(
        self,
        caller: identity.Caller,
        filename: str,
        content_type: str,
        size: int,
        conversation_id: str,
        limit: int,
    ) -> store.Attachment:
        name = files.check_filename(filename)
        kind = files.check_type(name, content_type)
        files.check_size(size, limit)
        conversation = _conversation(conversation_id)
        attachment_id = uuid.uuid4()
        async with self._pool.acquire() as conn:
            return await store.create(
                conn,
                attachment_id=attachment_id,
                user_id=caller.user_id,
                conversation_id=conversation,
                filename=name,
                content_type=kind.mime,
                size_bytes=size,
                s3_key=files.object_key(caller.user_id, str(attachment_id), name),
            )

    async def _queue(self, attachment: store.Attachment) -> store.Attachment:
        """Marks the attachment processing and sends its one ingestion message.

        Both happen in one transaction: if the message cannot be sent the
        attachment stays uploading and completion can be asked again.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            started = await store.start_processing(
                conn, attachment.user_id, attachment.id
            )
            if started is None:
                current = await store.get(conn, attachment.user_id, attachment.id)
                if current is None:
                    raise NotFound
                return current
            await self._aws.send(
                self._aws.config.queue_url, job_body(started), logs.REQUEST_ID.get()
            )
        logger.info("attachment %s queued for ingestion", started.id)
        return started

    async def _owned(self, caller: identity.Caller, raw_id: str) -> store.Attachment:
        attachment_id = store.parse_id(raw_id)
        if attachment_id is None:
            raise NotFound
        async with self._pool.acquire() as conn:
            found = await store.get(conn, caller.user_id, attachment_id)
        if found is None:
            raise NotFound
        return found

    @_translated
    async def CreateAttachment(
        self, request: ingest_pb2.CreateAttachmentRequest, context: Context
    ) -> ingest_pb2.CreateAttachmentResponse:
        caller = await identity.caller(context)
        attachment = await self._new(
            caller,
            request.filename,
            request.content_type,
            request.size_bytes,
            request.conversation_id,
            self._config.max_bytes,
        )
        url, headers = await self._aws.presign_put(
            attachment.s3_key, attachment.content_type, self._config.url_expiry_s
        )
        return ingest_pb2.CreateAttachmentResponse(
            attachment=to_proto(attachment), upload_url=url, upload_headers=headers
        )

    @_translated
    async def UploadAttachment(
        self, request: ingest_pb2.UploadAttachmentRequest, context: Context
    ) -> ingest_pb2.Attachment:
        caller = await identity.caller(context)
        data = request.file.data
        attachment = await self._new(
            caller,
            request.filename,
            request.file.content_type,
            len(data),
            request.conversation_id,
            self._config.direct_max_bytes,
        )
        try:
            await self._aws.put(attachment.s3_key, data, attachment.content_type)
        except AWS_ERRORS:
            async with self._pool.acquire() as conn:
                await store.delete(conn, caller.user_id, attachment.id)
            raise
        return to_proto(await self._queue(attachment))

    @_translated
    async def CompleteAttachment(
        self, request: ingest_pb2.CompleteAttachmentRequest, context: Context
    ) -> ingest_pb2.Attachment:
        caller = await identity.caller(context)
        attachment = await self._owned(caller, request.attachment_id)
        if attachment.status != "uploading":
            # Completing twice queues nothing more.
            return to_proto(attachment)
        size = await self._aws.object_size(attachment.s3_key)
        if size is None:
            raise NotUploaded("the file has not been uploaded yet; PUT it first")
        if size != attachment.size_bytes:
            raise NotUploaded(
                f"the uploaded file has {size} bytes, but {attachment.size_bytes} "
                "were announced; upload it again"
            )
        return to_proto(await self._queue(attachment))

    @_translated
    async def GetAttachment(
        self, request: ingest_pb2.GetAttachmentRequest, context: Context
    ) -> ingest_pb2.Attachment:
        caller = await identity.caller(context)
        return to_proto(await self._owned(caller, request.attachment_id))

    @_translated
    async def ListAttachments(
        self, request: ingest_pb2.ListAttachmentsRequest, context: Context
    ) -> ingest_pb2.ListAttachmentsResponse:
        caller = await identity.caller(context)
        if request.page_size < 0:
            raise files.UploadRejected("pageSize must not be negative", "BAD_PAGE")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_cursor(request.page_token)
        async with self._pool.acquire() as conn:
            found = await store.page(conn, caller.user_id, size + 1, after)
        reply = ingest_pb2.ListAttachmentsResponse(
            attachments=[to_proto(a) for a in found[:size]]
        )
        if len(found) > size:
            reply.next_page_token = _encode_cursor(found[size - 1])
        return reply

    @_translated
    async def DeleteAttachment(
        self, request: ingest_pb2.DeleteAttachmentRequest, context: Context
    ) -> empty_pb2.Empty:
        caller = await identity.caller(context)
        attachment_id = store.parse_id(request.attachment_id)
        if attachment_id is None:
            raise NotFound
        # The row goes only if the object went too; a worker holding the job
        # finds the row gone and drops the message.
        async with self._pool.acquire() as conn, conn.transaction():
            key = await store.delete(conn, caller.user_id, attachment_id)
            if key is None:
                raise NotFound
            await self._aws.delete_object(key)
        logger.info("attachment %s deleted", attachment_id)
        return empty_pb2.Empty()


def _attachment_of(message: Message) -> str:
    try:
        body = json.loads(message.body)
    except ValueError:
        return ""
    return str(body.get("attachmentId", "")) if isinstance(body, dict) else ""


async def peek_dead_letters(pool: asyncpg.Pool, aws: Aws) -> list[Message]:
    """Up to ``DLQ_PEEK_MAX`` messages of the DLQ, left where they are.

    Their attachments still ``processing`` are marked ``error`` on the way:
    the queue dead-letters a message on its own when a worker died on the last
    try, and nothing else would tell the attachment.
    """
    dlq = aws.config.dlq_url
    # Reading hides what was read; each message is made visible again at
    # once, so peeking never delays a redrive.
    seen: dict[str, Message] = {}
    try:
        while len(seen) < DLQ_PEEK_MAX:
            batch = await aws.receive(dlq, 10, 0, visibility_s=30)
            fresh = [m for m in batch if m.message_id not in seen]
            if not fresh:
                break
            seen.update((m.message_id, m) for m in batch)
    finally:
        for message in seen.values():
            await aws.extend(dlq, message.receipt_handle, 0)
    ids = [store.parse_id(_attachment_of(m)) for m in seen.values()]
    found = [i for i in ids if i is not None]
    if found:
        async with pool.acquire() as conn:
            marked = await store.dead_lettered(conn, found)
        if marked:
            logger.warning("%d dead-lettered attachments marked error", marked)
    return list(seen.values())


async def sweep_dead_letters(pool: asyncpg.Pool, aws: Aws, interval_s: float) -> None:
    """Peeks the DLQ every ``interval_s``, so that no dead-lettered attachment
    stays ``processing`` until an admin looks."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await peek_dead_letters(pool, aws)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next sweep tries again
            logger.warning("dlq sweep failed: %s", type(exc).__name__)


class QueueAdminServicer(admin_pb2_grpc.QueueAdminServicer):
    """The runbook's DLQ inspection and "Start DLQ redrive", for admins."""

    def __init__(self, pool: asyncpg.Pool, aws: Aws) -> None:
        self._pool = pool
        self._aws = aws

    @_translated
    async def GetDeadLetters(
        self, request: admin_pb2.GetDeadLettersRequest, context: Context
    ) -> admin_pb2.DeadLetters:
        await identity.admin(context)
        visible, in_flight = await self._aws.depth(self._aws.config.dlq_url)
        letters = await peek_dead_letters(self._pool, self._aws)
        return admin_pb2.DeadLetters(
            depth=visible + in_flight,
            messages=[
                admin_pb2.DeadLetter(
                    message_id=m.message_id,
                    attachment_id=_attachment_of(m),
                    receive_count=m.receive_count,
                )
                for m in letters
            ],
        )

    @_translated
    async def RedriveDeadLetters(
        self, request: admin_pb2.RedriveDeadLettersRequest, context: Context
    ) -> admin_pb2.RedriveResult:
        admin = await identity.admin(context)
        config = self._aws.config
        moved: list[uuid.UUID] = []
        count = 0
        while count < REDRIVE_MAX:
            batch = await self._aws.receive(config.dlq_url, 10, 0, visibility_s=60)
            if not batch:
                break
            for message in batch:
                # Sent before it is deleted: a crash in between leaves a
                # duplicate, which the worker's idempotent write absorbs.
                await self._aws.send(config.queue_url, message.body, message.request_id)
                await self._aws.delete_message(config.dlq_url, message.receipt_handle)
                count += 1
                parsed = store.parse_id(_attachment_of(message))
                if parsed is not None:
                    moved.append(parsed)
        if moved:
            async with self._pool.acquire() as conn:
                await store.requeued(conn, moved)
        logger.info("dlq redrive by %s moved %d messages", admin.user_id, count)
        return admin_pb2.RedriveResult(moved=count)
