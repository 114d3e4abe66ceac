"""The chat service's configuration, read once from the environment."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from services.runtime.config import (
    DEFAULT_METRICS_PORTS,
    SERVICE_NAMES,
    DatabaseConfig,
    Env,
    RedisConfig,
    ServerConfig,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatConfig:
    """Everything the chat service needs to know."""

    server: ServerConfig
    database: DatabaseConfig
    redis: RedisConfig
    rate_limit_rpm: int
    """``RATE_LIMIT_CHAT_RPM``: chat turns a user may start per window (30)."""
    rate_window_s: int
    """``JANNA_CHAT_RATE_WINDOW_S``: the sliding window's length (60)."""
    max_message_chars: int
    """``JANNA_CHAT_MAX_MESSAGE_CHARS``: longer messages are refused (32,000)."""
    history_max_tokens: int
    """``JANNA_CHAT_HISTORY_TOKENS``: most tokens of earlier turns sent (6,000)."""
    max_output_tokens: int
    """``JANNA_CHAT_MAX_OUTPUT_TOKENS``: the answer's length limit (1,024)."""
    rag_limit: int
    """``JANNA_CHAT_RAG_PASSAGES``: passages retrieved per turn (5)."""
    rag_timeout_s: float
    """``JANNA_CHAT_RAG_TIMEOUT_S``: how long retrieval may take (10)."""
    metrics_targets: Mapping[str, tuple[str, ...]]
    """Each service's Prometheus endpoints, ``host:port`` (one per replica), that
    the admin view reads: ``JANNA_{NAME}_METRICS_ADDR``, comma-separated; by
    default the host of ``JANNA_{NAME}_ADDR`` and ``JANNA_{NAME}_METRICS_PORT``.
    The ingest workers' are ``JANNA_INGEST_WORKER_METRICS_ADDR``, not derived."""
    scrape_timeout_s: float
    """``JANNA_METRICS_SCRAPE_TIMEOUT_S``: how long the admin view waits for
    one endpoint before showing its service as unavailable (1)."""

    @classmethod
    def from_env(cls, env: Env) -> ChatConfig:
        server = ServerConfig.from_env("chat", env)
        return cls(
            server=server,
            database=DatabaseConfig.from_env(env),
            redis=RedisConfig.from_env(env),
            rate_limit_rpm=env.integer("RATE_LIMIT_CHAT_RPM", 30),
            rate_window_s=env.integer("JANNA_CHAT_RATE_WINDOW_S", 60),
            max_message_chars=env.integer("JANNA_CHAT_MAX_MESSAGE_CHARS", 32_000),
            history_max_tokens=env.integer("JANNA_CHAT_HISTORY_TOKENS", 6_000),
            max_output_tokens=env.integer("JANNA_CHAT_MAX_OUTPUT_TOKENS", 1_024),
            rag_limit=env.integer("JANNA_CHAT_RAG_PASSAGES", 5),
            rag_timeout_s=env.number("JANNA_CHAT_RAG_TIMEOUT_S", 10.0),
            metrics_targets=_metrics_targets(env, server.peers),
            scrape_timeout_s=env.number("JANNA_METRICS_SCRAPE_TIMEOUT_S", 1.0),
        )


def _metrics_targets(env: Env, peers: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    targets: dict[str, tuple[str, ...]] = {}
    for name in SERVICE_NAMES:
        listed = env.items(f"JANNA_{name.upper()}_METRICS_ADDR")
        if listed:
            targets[name] = listed
            continue
        # Where the service's gRPC port is, its metrics port is too: the
        # same host (a container's name, a replica's address) serves both.
        host = peers[name].rpartition(":")[0] or "127.0.0.1"
        port = env.integer(
            f"JANNA_{name.upper()}_METRICS_PORT", DEFAULT_METRICS_PORTS[name]
        )
        targets[name] = (f"{host}:{port}",) if port else ()
    # Workers serve no gRPC, so there is no address to derive theirs from.
    targets["ingest-worker"] = env.items("JANNA_INGEST_WORKER_METRICS_ADDR")
    return targets
