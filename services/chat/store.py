"""Conversations and messages in Postgres; every read is scoped to its owner."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

TITLE_CHARS = 60


def parse_id(value: str) -> uuid.UUID | None:
    """The UUID in ``value``, or None: a malformed id is simply not found."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError):
        return None


def title_from(message: str) -> str:
    """A short title: the first line of the first message, cut at a word."""
    line = " ".join(message.split())
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return cut.rstrip(",.;:") + "…"


@dataclass(frozen=True)
class StoredMessage:
    id: uuid.UUID
    conversation_id: uuid.UUID
    role: str
    content: str
    status: str
    provider: str
    model: str
    citations: list[dict[str, Any]]
    created_at: datetime


@dataclass(frozen=True)
class StoredConversation:
    id: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime
    messages: list[StoredMessage] = field(default_factory=list)


def _conversation(row: asyncpg.Record) -> StoredConversation:
    return StoredConversation(
        row["id"], row["title"], row["created_at"], row["updated_at"]
    )


def _message(row: asyncpg.Record) -> StoredMessage:
    citations = row["citations"]
    if isinstance(citations, str):
        citations = json.loads(citations)
    return StoredMessage(
        id=row["id"],
        conversation_id=row["conversation_id"],
        role=row["role"],
        content=row["content"],
        status=row["status"],
        provider=row["provider"],
        model=row["model"],
        citations=citations,
        created_at=row["created_at"],
    )


def _encode_cursor(updated_at: datetime, conversation_id: uuid.UUID) -> str:
    raw = f"{updated_at.isoformat()}|{conversation_id}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID] | None:
    """The position a page token names; None when the token is malformed."""
    try:
        stamp, ident = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return datetime.fromisoformat(stamp), uuid.UUID(ident)
    except (ValueError, UnicodeDecodeError):
        return None


class ConversationStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def create(self, user_id: str, title: str) -> StoredConversation:
        row = await self._pool.fetchrow(
            "INSERT INTO conversations (user_id, title) VALUES ($1, $2) "
            "RETURNING id, title, created_at, updated_at",
            user_id,
            title,
        )
        assert row is not None
        return _conversation(row)

    async def page(
        self, user_id: str, size: int, after: tuple[datetime, uuid.UUID] | None
    ) -> tuple[list[StoredConversation], str]:
        """Newest first; returns the page and the next page's token ("" at the end)."""
        if after is None:
            rows = await self._pool.fetch(
                "SELECT id, title, created_at, updated_at FROM conversations "
                "WHERE user_id = $1 ORDER BY updated_at DESC, id DESC LIMIT $2",
                user_id,
                size + 1,
            )
        else:
            rows = await self._pool.fetch(
                "SELECT id, title, created_at, updated_at FROM conversations "
                "WHERE user_id = $1 AND (updated_at, id) < ($2, $3) "
                "ORDER BY updated_at DESC, id DESC LIMIT $4",
                user_id,
                after[0],
                after[1],
                size + 1,
            )
        found = [_conversation(r) for r in rows[:size]]
        token = ""
        if len(rows) > size:
            last = found[-1]
            token = _encode_cursor(last.updated_at, last.id)
        return found, token

    async def get(
        self, user_id: str, conversation_id: uuid.UUID, with_messages: bool = True
    ) -> StoredConversation | None:
        row = await self._pool.fetchrow(
            "SELECT id, title, created_at, updated_at FROM conversations "
            "WHERE id = $1 AND user_id = $2",
            conversation_id,
            user_id,
        )
        if row is None:
            return None
        conversation = _conversation(row)
        if with_messages:
            conversation.messages.extend(await self.messages(conversation_id))
        return conversation

    async def messages(self, conversation_id: uuid.UUID) -> list[StoredMessage]:
        rows = await self._pool.fetch(
            "SELECT * FROM messages WHERE conversation_id = $1 ORDER BY created_at, id",
            conversation_id,
        )
        return [_message(r) for r in rows]

    async def rename(
        self, user_id: str, conversation_id: uuid.UUID, title: str
    ) -> StoredConversation | None:
        row = await self._pool.fetchrow(
            "UPDATE conversations SET title = $3, updated_at = now() "
            "WHERE id = $1 AND user_id = $2 "
            "RETURNING id, title, created_at, updated_at",
            conversation_id,
            user_id,
            title,
        )
        return None if row is None else _conversation(row)

    async def delete(self, user_id: str, conversation_id: uuid.UUID) -> bool:
        """Deletes the conversation and, by cascade, its messages."""
        status = await self._pool.execute(
            "DELETE FROM conversations WHERE id = $1 AND user_id = $2",
            conversation_id,
            user_id,
        )
        return bool(status.endswith(" 1"))

    async def add_message(
        self,
        conversation_id: uuid.UUID,
        role: str,
        content: str,
        *,
        status: str = "complete",
        provider: str = "",
        model: str = "",
        citations: list[dict[str, Any]] | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> StoredMessage:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO messages (conversation_id, role, content, status, "
                "provider, model, citations, input_tokens, output_tokens) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9) RETURNING *",
                conversation_id,
                role,
                content,
                status,
                provider,
                model,
                json.dumps(citations or []),
                input_tokens,
                output_tokens,
            )
            # A conversation made empty (POST /api/conversations without a
            # title) is named by its first message, like one the turn makes.
            await conn.execute(
                "UPDATE conversations SET updated_at = now(), title = CASE "
                "WHEN $2::text IS NOT NULL AND title = '' THEN $2 ELSE title END "
                "WHERE id = $1",
                conversation_id,
                title_from(content) if role == "user" else None,
            )
        assert row is not None
        return _message(row)
