"""The per-user chat limit: a sliding window in Redis, checked and recorded atomically.

``rl:{userId}:chat`` is a sorted set with one member per admitted turn, scored
by its time in milliseconds. One Lua script drops the members older than the
window, counts the rest and, when there is room, adds the new member — all in
one step, so concurrent turns can never overshoot the limit. Deleting the key
(``redis-cli DEL rl:USER_ID:chat``) clears the window at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

_SLIDING_WINDOW = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  return {1, count + 1, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local wait = window
if oldest[2] then wait = tonumber(oldest[2]) + window - now end
return {0, count, wait}
"""


def _escape_glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def chat_key(user_id: str) -> str:
    return f"rl:{user_id}:chat"


class LimiterUnavailable(RuntimeError):
    """Redis did not answer; the chat limit fails closed."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    count: int
    """Turns in the window, this one included when admitted."""
    retry_after_s: int
    """Whole seconds until a turn would be admitted (0 when admitted)."""


class ChatRateLimiter:
    def __init__(self, client: redis.Redis, limit: int, window_s: int) -> None:
        self._client = client
        self._limit = limit
        self._window_ms = window_s * 1000
        self._script = client.register_script(_SLIDING_WINDOW)

    async def admit(self, user_id: str) -> Decision:
        now_ms = int(time.time() * 1000)
        member = f"{now_ms}-{uuid.uuid4().hex[:12]}"
        try:
            allowed, count, wait_ms = await self._script(
                keys=[chat_key(user_id)],
                args=[now_ms, self._window_ms, self._limit, member],
            )
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(str(exc)) from exc
        retry = 0 if allowed else max(1, -(-int(wait_ms) // 1000))
        return Decision(bool(allowed), int(count), retry)

    async def reset(self, user_id: str) -> int:
        """Deletes every ``rl:{user_id}:*`` key; returns how many there were."""
        pattern = f"rl:{_escape_glob(user_id)}:*"
        keys = [key async for key in self._client.scan_iter(match=pattern)]
        if not keys:
            return 0
        return int(await self._client.delete(*keys))
