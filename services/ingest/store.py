"""The attachments table and the chunks the worker writes, in SQL."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

logger = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_COLUMNS = """id, user_id, conversation_id, filename, content_type, size_bytes,
    s3_key, status, error, content_hash, chunk_count, page_count, attempts,
    reused_from, created_at, updated_at"""


@dataclass(frozen=True)
class Attachment:
    id: uuid.UUID
    user_id: str
    conversation_id: uuid.UUID | None
    filename: str
    content_type: str
    size_bytes: int
    s3_key: str
    status: str
    error: str
    content_hash: str | None
    chunk_count: int
    page_count: int
    attempts: int
    reused_from: uuid.UUID | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: asyncpg.Record) -> Attachment:
        return cls(**dict(row))


@dataclass(frozen=True)
class NewChunk:
    """One chunk as the worker made it, with its embedding."""

    index: int
    page: int | None
    content: str
    embedding: Sequence[float]


def parse_id(raw: str) -> uuid.UUID | None:
    """The id, or None when ``raw`` is not a UUID (such an id exists nowhere)."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def vector_literal(values: Sequence[float]) -> str:
    """pgvector's text form; asyncpg has no codec for the type."""
    return "[" + ",".join(f"{v:.7g}" for v in values) + "]"


async def create(
    conn: Conn,
    *,
    attachment_id: uuid.UUID,
    user_id: str,
    conversation_id: uuid.UUID | None,
    filename: str,
    content_type: str,
    size_bytes: int,
    s3_key: str,
) -> Attachment:
    row = await conn.fetchrow(
        f"""
        INSERT INTO attachments (id, user_id, conversation_id, filename,
                                 content_type, size_bytes, s3_key)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING {_COLUMNS}
        """,
        attachment_id,
        user_id,
        conversation_id,
        filename,
        content_type,
        size_bytes,
        s3_key,
    )
    assert row is not None
    return Attachment.of(row)


async def get(conn: Conn, user_id: str, attachment_id: uuid.UUID) -> Attachment | None:
    """The caller's attachment; another user's is as absent as a missing one."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM attachments WHERE id = $1 AND user_id = $2",
        attachment_id,
        user_id,
    )
    return None if row is None else Attachment.of(row)


async def page(
    conn: Conn,
    user_id: str,
    size: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Attachment]:
    """The caller's attachments, newest first, ``size`` at most, after a cursor."""
    if after is None:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM attachments WHERE user_id = $1
                ORDER BY created_at DESC, id DESC LIMIT $2""",
            user_id,
            size,
        )
    else:
        rows = await conn.fetch(
            f"""SELECT {_COLUMNS} FROM attachments
                WHERE user_id = $1 AND (created_at, id) < ($2, $3)
                ORDER BY created_at DESC, id DESC LIMIT $4""",
            user_id,
            after[0],
            after[1],
            size,
        )
    return [Attachment.of(r) for r in rows]


async def start_processing(
    conn: Conn, user_id: str, attachment_id: uuid.UUID
) -> Attachment | None:
    """Moves an uploading attachment to processing; None when it was not uploading,
    so that of two concurrent completions only one queues a job."""
    row = await conn.fetchrow(
        f"""
        UPDATE attachments SET status = 'processing', error = '', updated_at = now()
        WHERE id = $1 AND user_id = $2 AND status = 'uploading'
        RETURNING {_COLUMNS}
        """,
        attachment_id,
        user_id,
    )
    return None if row is None else Attachment.of(row)


async def delete(conn: Conn, user_id: str, attachment_id: uuid.UUID) -> str | None:
    """Deletes the attachment (its chunks go with it); returns its S3 key."""
    key: str | None = await conn.fetchval(
        "DELETE FROM attachments WHERE id = $1 AND user_id = $2 RETURNING s3_key",
        attachment_id,
        user_id,
    )
    return key


# --- the worker's side ------------------------------------------------------


async def record_attempt(conn: Conn, attachment_id: uuid.UUID, attempt: int) -> None:
    await conn.execute(
        "UPDATE attachments SET attempts = $2, updated_at = now() WHERE id = $1",
        attachment_id,
        attempt,
    )


async def note_retry(conn: Conn, attachment_id: uuid.UUID, message: str) -> None:
    """Keeps the attachment processing, with the reason of the failed try."""
    await conn.execute(
        """UPDATE attachments SET error = $2, updated_at = now()
           WHERE id = $1 AND status = 'processing'""",
        attachment_id,
        message,
    )


async def fail(conn: Conn, attachment_id: uuid.UUID, message: str) -> None:
    await conn.execute(
        """UPDATE attachments SET status = 'error', error = $2, updated_at = now()
           WHERE id = $1 AND status <> 'ready'""",
        attachment_id,
        message,
    )


async def dead_lettered(conn: Conn, attachment_ids: Sequence[uuid.UUID]) -> int:
    """Attachments whose messages reached the DLQ while still processing (the
    worker died on its last try, so nobody marked them): now in error."""
    status: str = await conn.execute(
        """UPDATE attachments
           SET status = 'error', updated_at = now(),
               error = 'processing failed repeatedly. '
                       'An administrator can retry it from the dead-letter queue.'
           WHERE id = ANY($1::uuid[]) AND status = 'processing'""",
        list(attachment_ids),
    )
    return int(status.rsplit(" ", 1)[-1])


async def requeued(conn: Conn, attachment_ids: Sequence[uuid.UUID]) -> None:
    """Attachments whose messages were redriven are processing again."""
    await conn.execute(
        """UPDATE attachments SET status = 'processing', error = '', attempts = 0,
                                  updated_at = now()
           WHERE id = ANY($1::uuid[]) AND status IN ('processing', 'error')""",
        list(attachment_ids),
    )


async def reusable(
    conn: Conn, user_id: str, content_hash: str, exclude: uuid.UUID
) -> Attachment | None:
    """A ready attachment of the same user with the same bytes, if any."""
    row = await conn.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM attachments
        WHERE user_id = $1 AND content_hash = $2 AND status = 'ready' AND id <> $3
        ORDER BY created_at LIMIT 1
        """,
        user_id,
        content_hash,
        exclude,
    )
    return None if row is None else Attachment.of(row)


async def lock(conn: Conn, attachment_id: uuid.UUID) -> Attachment | None:
    """Locks the attachment row for the rest of the transaction; None if deleted.

    Two workers that hold the same job (a message that came back while its
    first worker was still busy) write one after the other, never interleaved.
    """
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM attachments WHERE id = $1 FOR UPDATE", attachment_id
    )
    return None if row is None else Attachment.of(row)


async def replace_chunks(
    conn: Conn,
    attachment: Attachment,
    chunks: Sequence[NewChunk],
    page_count: int,
    content_hash: str,
) -> None:
    """Writes the attachment's chunks in place of any it had, and marks it ready.

    The caller holds the row lock and a transaction, so a redelivered message
    replaces the chunks of an earlier try instead of adding to them.
    """
    await conn.execute(
        'DELETE FROM document_chunks WHERE "attachmentId" = $1', attachment.id
    )
    await conn.executemany(
        """
        INSERT INTO document_chunks ("attachmentId", "userId", filename,
                                     "chunkIndex", "pageNumber", content, embedding)
        VALUES ($1, $2, $3, $4, $5, $6, $7::vector)
        """,
        [
            (
                attachment.id,
                attachment.user_id,
                attachment.filename,
                chunk.index,
                chunk.page,
                chunk.content,
                vector_literal(chunk.embedding),
            )
            for chunk in chunks
        ],
    )
    await _ready(conn, attachment.id, len(chunks), page_count, content_hash, None)


async def copy_chunks(
    conn: Conn, attachment: Attachment, source: Attachment, content_hash: str
) -> int:
    """Gives the attachment copies of ``source``'s chunks and marks it ready."""
    await conn.execute(
        'DELETE FROM document_chunks WHERE "attachmentId" = $1', attachment.id
    )
    copied: str = await conn.execute(
        """
        INSERT INTO document_chunks ("attachmentId", "userId", filename,
                                     "chunkIndex", "pageNumber", content, embedding)
        SELECT $1, $2, $3, "chunkIndex", "pageNumber", content, embedding
        FROM document_chunks WHERE "attachmentId" = $4
        """,
        attachment.id,
        attachment.user_id,
        attachment.filename,
        source.id,
    )
    count = int(copied.rsplit(" ", 1)[-1])
    await _ready(conn, attachment.id, count, source.page_count, content_hash, source.id)
    return count


async def _ready(
    conn: Conn,
    attachment_id: uuid.UUID,
    chunk_count: int,
    page_count: int,
    content_hash: str,
    reused_from: uuid.UUID | None,
) -> None:
    await conn.execute(
        """
        UPDATE attachments
        SET status = 'ready', error = '', chunk_count = $2, page_count = $3,
            content_hash = $4, reused_from = $5, updated_at = now()
        WHERE id = $1
        """,
        attachment_id,
        chunk_count,
        page_count,
        content_hash,
        reused_from,
    )
