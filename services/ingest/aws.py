"""The attachments' bucket and the ingestion queues, through aiobotocore."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
    BotoCoreError,
    ClientError,
)

from services.ingest.config import AwsConfig

logger = logging.getLogger(__name__)

AWS_ERRORS = (ClientError, BotoCoreError)
"""What a call to S3 or SQS raises when the service refuses or cannot be reached."""

REQUEST_ID_ATTRIBUTE = "requestId"
"""The message attribute that carries the id of the request that sent it."""

_READ_CHUNK = 1024 * 1024
_MISSING = ("NoSuchKey", "404", "NotFound")


class ObjectMissing(LookupError):
    """The object is not in the bucket (deleted, or never uploaded)."""


class ObjectTooLarge(ValueError):
    """The object is larger than the worker accepts."""


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("" for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


@dataclass(frozen=True)
class Message:
    """One delivery of a queue message."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    """How many times SQS has delivered it, this time included."""
    request_id: str = ""
    """The id of the request that sent it (the ``requestId`` attribute)."""


@dataclass(frozen=True)
class Download:
    size: int
    sha256: str


class Aws:
    """Open S3 and SQS clients; one per process, closed with the process."""

    def __init__(self, config: AwsConfig, s3: Any, sqs: Any) -> None:
        self.config = config
        self._s3 = s3
        self._sqs = sqs

    @classmethod
    @asynccontextmanager
    async def connect(cls, config: AwsConfig) -> AsyncIterator[Aws]:
        session = get_session()
        options: dict[str, Any] = {
            "connect_timeout": 5,
            # Above the longest SQS long poll (20 s).
            "read_timeout": 60,
            "retries": {"max_attempts": 3, "mode": "standard"},
        }
        if config.endpoint_url:
            # S3-compatible servers (moto, MinIO) want path-style URLs.
            options["s3"] = {"addressing_style": "path"}
        args: dict[str, Any] = {
            "region_name": config.region,
            "endpoint_url": config.endpoint_url,
            "config": AioConfig(**options),
        }
        async with AsyncExitStack() as stack:
            s3 = await stack.enter_async_context(session.create_client("s3", **args))
            sqs = await stack.enter_async_context(session.create_client("sqs", **args))
            yield cls(config, s3, sqs)

    # --- S3 ---------------------------------------------------------------

    async def presign_put(
        self, key: str, content_type: str, expiry_s: int
    ) -> tuple[str, dict[str, str]]:
        """A URL that accepts one PUT of the object, and the headers it needs."""
        url: str = await self._s3.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.config.bucket,
                "Key": key,
                "ContentType": content_type,
            },
            ExpiresIn=expiry_s,
        )
        return url, {"Content-Type": content_type}

    async def object_size(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        try:
            head = await self._s3.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise
        return int(head["ContentLength"])

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._s3.put_object(
            Bucket=self.config.bucket, Key=key, Body=data, ContentType=content_type
        )

    async def delete_object(self, key: str) -> None:
        await self._s3.delete_object(Bucket=self.config.bucket, Key=key)

    async def download(self, key: str, into: IO[bytes], max_bytes: int) -> Download:
        """Streams the object into a file, a megabyte at a time, hashing it."""
        try:
            reply = await self._s3.get_object(Bucket=self.config.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                raise ObjectMissing(key) from exc
            raise
        if int(reply.get("ContentLength", 0)) > max_bytes:
            reply["Body"].close()
            raise ObjectTooLarge(key)
        digest = hashlib.sha256()
        size = 0
        async with reply["Body"] as body:
            while chunk := await body.read(_READ_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise ObjectTooLarge(key)
                digest.update(chunk)
                into.write(chunk)
        into.flush()
        return Download(size=size, sha256=digest.hexdigest())

    # --- SQS --------------------------------------------------------------

    async def send(self, queue_url: str, body: str, request_id: str = "") -> str:
        """Sends one message; ``request_id`` travels as its ``requestId``
        attribute, so the job's log lines carry the id of the request that
        caused it."""
        args: dict[str, Any] = {"QueueUrl": queue_url, "MessageBody": body}
        if request_id:
            args["MessageAttributes"] = {
                REQUEST_ID_ATTRIBUTE: {"DataType": "String", "StringValue": request_id}
            }
        reply = await self._sqs.send_message(**args)
        return str(reply["MessageId"])

    async def receive(
        self,
        queue_url: str,
        max_messages: int,
        wait_s: int,
        visibility_s: int | None = None,
    ) -> list[Message]:
        args: dict[str, Any] = {
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": max(1, min(10, max_messages)),
            "WaitTimeSeconds": wait_s,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
            "MessageAttributeNames": [REQUEST_ID_ATTRIBUTE],
        }
        if visibility_s is not None:
            args["VisibilityTimeout"] = visibility_s
        reply = await self._sqs.receive_message(**args)
        return [
            Message(
                message_id=m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                body=m["Body"],
                receive_count=int(
                    m.get("Attributes", {}).get("ApproximateReceiveCount", "1")
                ),
                request_id=str(
                    m.get("MessageAttributes", {})
                    .get(REQUEST_ID_ATTRIBUTE, {})
                    .get("StringValue", "")
                ),
            )
            for m in reply.get("Messages", [])
        ]

    async def extend(self, queue_url: str, receipt_handle: str, seconds: int) -> None:
        await self._sqs.change_message_visibility(
            QueueUrl=queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=seconds
        )

    async def delete_message(self, queue_url: str, receipt_handle: str) -> None:
        await self._sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt_handle)

    async def depth(self, queue_url: str) -> tuple[int, int]:
        """Visible and in-flight messages, as SQS approximates them."""
        reply = await self._sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        attributes = reply.get("Attributes", {})
        return (
            int(attributes.get("ApproximateNumberOfMessages", 0)),
            int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        )

    async def max_receive_count(self, queue_url: str) -> int | None:
        """The queue's redrive policy: deliveries before SQS dead-letters a message."""
        reply = await self._sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["RedrivePolicy"]
        )
        policy = reply.get("Attributes", {}).get("RedrivePolicy")
        if not policy:
            return None
        return int(json.loads(policy)["maxReceiveCount"])
