"""What the chat service counts: turns, refused turns, time to first token.

Each figure goes to this replica's Prometheus endpoint and to the shared
per-minute window in Redis (:mod:`services.chat.window`) that the admin view
reads.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram

from services.chat.window import TTFT_BUCKETS_S, TurnWindow

logger = logging.getLogger(__name__)

TURNS = Counter(
    "janna_chat_turns_total",
    "Chat turns that reached the model, by how they ended (complete, error, stopped).",
    ["outcome"],
)
RATE_LIMITED = Counter(
    "janna_chat_rate_limited_total",
    "Chat turns refused by the per-user limit, by reason "
    "(RATE_LIMITED, RATE_LIMITER_UNAVAILABLE).",
    ["reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "janna_chat_time_to_first_token_seconds",
    "From the chat service receiving a turn to it sending the turn's first "
    "token: history, retrieval, prompt and the model's own wait included.",
    buckets=TTFT_BUCKETS_S,
)


class TurnStats:
    """Records one replica's chat figures in both places."""

    def __init__(self, window: TurnWindow) -> None:
        self._window = window

    def rate_limited(self, reason: str) -> None:
        RATE_LIMITED.labels(reason).inc()
        self._window.rate_limited()

    def first_token(self, seconds: float) -> None:
        TIME_TO_FIRST_TOKEN.observe(seconds)
        self._window.first_token(seconds)

    def turn_ended(self, outcome: str) -> None:
        TURNS.labels(outcome).inc()
        self._window.turn(outcome)
