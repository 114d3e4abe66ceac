"""What the auth service counts: verdicts at the edge, the per-IP limit, the users.

The user counts are read from the users table, which only this service
reads, when Prometheus asks for them (at most once per ``max_age_s``); the
admin view shows them from here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.runtime.metrics import LoopCollector

logger = logging.getLogger(__name__)

ALLOWED = Counter(
    "janna_auth_allowed_total",
    "Requests the edge's ext_authz check admitted.",
)
DENIED = Counter(
    "janna_auth_denied_total",
    "Requests the edge's ext_authz check refused or could not decide on, by "
    "reason (UNAUTHENTICATED, USER_DISABLED, ADMIN_REQUIRED, AUTH_UNAVAILABLE).",
    ["reason"],
)
IP_LIMITED = Counter(
    "janna_auth_ip_rate_limited_total",
    "Requests refused because their client address was over the per-IP limit.",
)
IP_UNCOUNTED = Counter(
    "janna_auth_ip_rate_limit_uncounted_total",
    "Requests admitted uncounted because Redis could not be asked.",
)

_USER_COUNTS = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE last_seen_at > now() - interval '1 day') AS active,
       count(*) FILTER (WHERE disabled) AS disabled
FROM users
"""

DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def user_counts(pool: asyncpg.Pool, loop: asyncio.AbstractEventLoop) -> LoopCollector:
    """``janna_auth_users``, ``..._active_last_day`` and ``..._disabled``."""

    async def read() -> Sequence[Metric] | None:
        try:
            row = await pool.fetchrow(_USER_COUNTS)
        except DATABASE_ERRORS as exc:
            logger.warning("user counts not read: %s", exc)
            return None
        assert row is not None  # an aggregate always returns its one row
        return [
            GaugeMetricFamily(
                "janna_auth_users", "Users ever seen.", value=row["total"]
            ),
            GaugeMetricFamily(
                "janna_auth_users_active_last_day",
                "Users seen in the last 24 hours (last_seen_at advances at most "
                "once per JANNA_USER_CACHE_TTL_S).",
                value=row["active"],
            ),
            GaugeMetricFamily(
                "janna_auth_users_disabled",
                "Users who are disabled.",
                value=row["disabled"],
            ),
        ]

    return LoopCollector("users", read, loop, max_age_s=5.0)
