"""Chat figures of the last minutes, counted in Redis so every replica adds to them.

A Prometheus counter belongs to one process and starts from zero when it
restarts; the admin view's "turns in the last five minutes" must hold for the
whole service however many replicas serve it, and survive their restarts. So
each replica also adds what it sees to a hash per minute,
``metrics:chat:{unix minute}`` (fields ``turns``, ``errors``, ``stopped``,
``rate_limited``, ``ttft_sum_ms`` and ``ttft_{i}``, the count of
first tokens in bucket ``i`` of :data:`TTFT_BUCKETS_S`), kept for two hours.
A window is the sum of its minutes' hashes, and its percentiles come from the
summed buckets, as Prometheus computes them from a histogram.

Writes are sent in the background: a slow or absent Redis costs a turn
nothing, and only loses figures (said once a minute in the log).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.runtime.scrape import quantile

logger = logging.getLogger(__name__)

KEY_PREFIX = "metrics:chat:"
RETENTION_S = 2 * 60 * 60
TTFT_BUCKETS_S = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 60.0)
"""Upper bounds of the time-to-first-token buckets; one more catches the rest."""

_LOG_EVERY_S = 60.0


def key(minute: int) -> str:
    return f"{KEY_PREFIX}{minute}"


@dataclass(frozen=True)
class Totals:
    """What a window's minutes add up to."""

    turns: int = 0
    """Turns that reached the model, however they ended."""
    errors: int = 0
    """Turns that ended with an error event."""
    stopped: int = 0
    """Turns the user left before the answer ended."""
    rate_limited: int = 0
    """Turns the per-user limit refused."""
    ttft_buckets: tuple[int, ...] = field(default=(0,) * (len(TTFT_BUCKETS_S) + 1))
    """First tokens per bucket of :data:`TTFT_BUCKETS_S` (not cumulative)."""
    ttft_sum_ms: float = 0.0

    @property
    def ttft_count(self) -> int:
        return sum(self.ttft_buckets)

    def ttft_quantile_ms(self, q: float) -> float | None:
        running, cumulative = 0, []
        for bound, count in zip(
            (*TTFT_BUCKETS_S, float("inf")), self.ttft_buckets, strict=True
        ):
            running += count
            cumulative.append((bound, float(running)))
        seconds = quantile(q, cumulative)
        return None if seconds is None else round(seconds * 1000, 1)


def _add(hashes: list[Mapping[str, str]]) -> Totals:
    sums: dict[str, float] = {}
    for fields in hashes:
        for name, raw in fields.items():
            try:
                sums[name] = sums.get(name, 0.0) + float(raw)
            except ValueError:
                continue
    return Totals(
        turns=int(sums.get("turns", 0)),
        errors=int(sums.get("errors", 0)),
        stopped=int(sums.get("stopped", 0)),
        rate_limited=int(sums.get("rate_limited", 0)),
        ttft_buckets=tuple(
            int(sums.get(f"ttft_{i}", 0)) for i in range(len(TTFT_BUCKETS_S) + 1)
        ),
        ttft_sum_ms=sums.get("ttft_sum_ms", 0.0),
    )


class WindowUnavailable(RuntimeError):
    """Redis could not be read."""


class TurnWindow:
    """Adds a replica's chat figures to the per-minute hashes, and reads them."""

    def __init__(
        self, client: redis.Redis, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self._failed_at: float | None = None

    def _minute(self) -> int:
        return int(self._clock() // 60)

    def add(self, **fields: int) -> None:
        """Adds to this minute's fields, in the background."""
        task = asyncio.create_task(self._write(self._minute(), fields))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def turn(self, outcome: str) -> None:
        """A turn that reached the model ended: complete, error or stopped."""
        fields = {"turns": 1}
        if outcome == "error":
            fields["errors"] = 1
        elif outcome == "stopped":
            fields["stopped"] = 1
        self.add(**fields)

    def first_token(self, seconds: float) -> None:
        self.add(
            ttft_sum_ms=round(seconds * 1000),
            **{f"ttft_{bisect.bisect_left(TTFT_BUCKETS_S, seconds)}": 1},
        )

    def rate_limited(self) -> None:
        self.add(rate_limited=1)

    async def _write(self, minute: int, fields: Mapping[str, int]) -> None:
        name = key(minute)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for field_name, amount in fields.items():
                    pipe.hincrby(name, field_name, amount)
                pipe.expire(name, RETENTION_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            now = time.monotonic()
            if self._failed_at is None or now - self._failed_at >= _LOG_EVERY_S:
                self._failed_at = now
                logger.warning("chat figures not recorded in Redis: %s", exc)

    async def read(self, minutes: int) -> Totals:
        """The last ``minutes`` whole minutes and the current one, added up."""
        current = self._minute()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for minute in range(current - minutes, current + 1):
                    pipe.hgetall(key(minute))
                hashes = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise WindowUnavailable(str(exc)) from exc
        return _add([h for h in hashes if isinstance(h, dict)])

    async def aclose(self) -> None:
        """Lets the writes in flight finish (briefly) before the client closes."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2.0)
