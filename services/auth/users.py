"""The users table, and each user's disabled flag cached with instant invalidation.

Every auth replica keeps the flags it has looked up in memory. Disabling or
enabling a user publishes the user's id on a Redis channel; every replica
listens and drops its entry at once, so a change holds on the next request.
The cache is trusted only while that subscription is live (a reconnect
clears it, since messages may have been missed) and each entry only for a
short TTL, as a safety net.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from services.runtime.identity import Caller

logger = logging.getLogger(__name__)

CHANNEL = "auth:user-state"
"""Redis channel carrying the id of each user whose state changed."""

_QUERY_TIMEOUT_S = 2.0
_RECONNECT_S = 1.0
_POLL_S = 0.25
_MAX_ENTRIES = 100_000

_COLUMNS = "id, email, groups, disabled, created_at, last_seen_at"

# OSError includes the TimeoutError of a query past _QUERY_TIMEOUT_S and a
# refused connection; InterfaceError a pool or connection being closed.
_POSTGRES_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class StoreError(Exception):
    """Postgres did not answer; the caller cannot be decided on."""


class BadPageToken(ValueError):
    """A page token this service did not issue."""


@dataclass(frozen=True)
class UserRow:
    """One row of the users table."""

    id: str
    email: str
    groups: tuple[str, ...]
    disabled: bool
    created_at: datetime
    last_seen_at: datetime


def _row(record: asyncpg.Record) -> UserRow:
    return UserRow(
        id=record["id"],
        email=record["email"],
        groups=tuple(record["groups"]),
        disabled=record["disabled"],
        created_at=record["created_at"],
        last_seen_at=record["last_seen_at"],
    )


def encode_page_token(row: UserRow) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, user_id = json.loads(raw)
        return datetime.fromisoformat(created), str(user_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadPageToken("page_token is not one this service issued") from exc


class UserStore:
    """Reads and writes the users table; Postgres errors become StoreError."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, caller: Caller) -> bool:
        """Records the caller as seen now; returns whether they are disabled."""
        try:
            disabled: bool = await self._pool.fetchval(
                """
                INSERT INTO users (id, email, groups) VALUES ($1, $2, $3)
                ON CONFLICT (id) DO UPDATE SET
                    -- Access tokens carry no email; keep the one we know.
                    email = CASE WHEN EXCLUDED.email = '' THEN users.email
                                 ELSE EXCLUDED.email END,
                    groups = EXCLUDED.groups,
                    last_seen_at = now()
                RETURNING disabled
                """,
                caller.user_id,
                caller.email,
                list(caller.groups),
                timeout=_QUERY_TIMEOUT_S,
            )
        except _POSTGRES_ERRORS as exc:
            raise StoreError(f"recording user failed: {exc!r}") from exc
        return disabled

    async def get(self, user_id: str) -> UserRow | None:
        try:
            record = await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM users WHERE id = $1",
                user_id,
                timeout=_QUERY_TIMEOUT_S,
            )
        except _POSTGRES_ERRORS as exc:
            raise StoreError(f"reading user failed: {exc!r}") from exc
        return None if record is None else _row(record)

    async def list(
        self, limit: int, after: tuple[datetime, str] | None
    ) -> Sequence[UserRow]:
        """Users newest first, from just after ``after`` (created_at, id)."""
        created, user_id = after if after is not None else (None, "")
        try:
            records = await self._pool.fetch(
                f"""
                SELECT {_COLUMNS} FROM users
                WHERE $1::timestamptz IS NULL OR (created_at, id) < ($1, $2)
                ORDER BY created_at DESC, id DESC
                LIMIT $3
                """,
                created,
                user_id,
                limit,
                timeout=_QUERY_TIMEOUT_S,
            )
        except _POSTGRES_ERRORS as exc:
            raise StoreError(f"listing users failed: {exc!r}") from exc
        return [_row(r) for r in records]

    async def set_disabled(self, user_id: str, disabled: bool) -> UserRow | None:
        """Sets the flag; None when there is no such user."""
        try:
            record = await self._pool.fetchrow(
                f"UPDATE users SET disabled = $2 WHERE id = $1 RETURNING {_COLUMNS}",
                user_id,
                disabled,
                timeout=_QUERY_TIMEOUT_S,
            )
        except _POSTGRES_ERRORS as exc:
            raise StoreError(f"updating user failed: {exc!r}") from exc
        return None if record is None else _row(record)


@dataclass(frozen=True)
class _Entry:
    disabled: bool
    expires_at: float


class UserStates:
    """Each caller's disabled flag, cached per process, invalidated via Redis."""

    def __init__(
        self,
        store: UserStore,
        redis_client: redis.Redis,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._redis = redis_client
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # Bumped by every invalidation, so that a lookup which raced one
        # does not cache the value it read before the change.
        self._generation = 0
        self._live = False
        self._stop = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """Whether invalidations are being received, so the cache may be used."""
        return self._live

    async def disabled(self, caller: Caller) -> bool:
        """Whether the caller is disabled; records them as seen when asking."""
        now = self._clock()
        entry = self._entries.get(caller.user_id)
        if self._live and entry is not None and entry.expires_at > now:
            return entry.disabled
        generation = self._generation
        disabled = await self._store.record(caller)
        if self._live and generation == self._generation:
            self._entries.pop(caller.user_id, None)
            if len(self._entries) >= _MAX_ENTRIES:
                # Dicts keep insertion order: drop the oldest entry.
                del self._entries[next(iter(self._entries))]
            self._entries[caller.user_id] = _Entry(disabled, now + self._ttl_s)
        return disabled

    async def set_disabled(self, user_id: str, disabled: bool) -> UserRow | None:
        """Changes the flag in Postgres, then tells every replica."""
        row = await self._store.set_disabled(user_id, disabled)
        self._forget(user_id)
        if row is not None:
            try:
                await self._redis.publish(CHANNEL, user_id)
            except RedisError as exc:
                # Other replicas miss this one; their subscriptions are broken
                # too (same Redis), so they are not using their caches.
                logger.warning("user state change not published: %s", exc)
        return row

    def _forget(self, user_id: str) -> None:
        self._generation += 1
        self._entries.pop(user_id, None)

    def _reset(self, live: bool) -> None:
        self._generation += 1
        self._entries.clear()
        self._live = live

    def start(self) -> None:
        """Starts receiving invalidations in the background."""
        if self._listener is None:
            self._stop.clear()
            self._listener = asyncio.create_task(
                self._listen(), name="user-state-invalidations"
            )

    async def aclose(self) -> None:
        """Stops receiving invalidations; the cache is not used after this."""
        self._stop.set()
        if self._listener is not None:
            await self._listener
            self._listener = None

    async def _listen(self) -> None:
        # Polls with a short timeout and stops on an event instead of being
        # cancelled: redis-py can swallow a cancellation that arrives while
        # it connects, and the task would never end.
        failing = False
        while not self._stop.is_set():
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    while not self._stop.is_set():
                        message = await pubsub.get_message(timeout=_POLL_S)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            # Also after a silent reconnect: whatever was
                            # published meanwhile is lost, so start afresh.
                            self._reset(live=True)
                            if failing:
                                logger.info("user state invalidations resumed")
                            failing = False
                        elif message["type"] == "message":
                            self._forget(str(message["data"]))
            except (RedisError, OSError) as exc:
                self._reset(live=False)
                if not failing:
                    logger.warning(
                        "user state invalidations lost (%s); asking Postgres "
                        "on every request until they resume",
                        exc,
                    )
                failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), _RECONNECT_S)
        self._reset(live=False)
