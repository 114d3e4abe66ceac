"""The chat service's configuration, read once from the environment."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.runtime.config import (
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

    @classmethod
    def from_env(cls, env: Env) -> ChatConfig:
        return cls(
            server=ServerConfig.from_env("chat", env),
            database=DatabaseConfig.from_env(env),
            redis=RedisConfig.from_env(env),
            rate_limit_rpm=env.integer("RATE_LIMIT_CHAT_RPM", 30),
            rate_window_s=env.integer("JANNA_CHAT_RATE_WINDOW_S", 60),
            max_message_chars=env.integer("JANNA_CHAT_MAX_MESSAGE_CHARS", 32_000),
            history_max_tokens=env.integer("JANNA_CHAT_HISTORY_TOKENS", 6_000),
            max_output_tokens=env.integer("JANNA_CHAT_MAX_OUTPUT_TOKENS", 1_024),
            rag_limit=env.integer("JANNA_CHAT_RAG_PASSAGES", 5),
            rag_timeout_s=env.number("JANNA_CHAT_RAG_TIMEOUT_S", 10.0),
        )
