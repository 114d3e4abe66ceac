"""Reading configuration from the environment, once, into frozen dataclasses.

Every service builds its config at its entry point with these helpers and
passes the object down; handlers never read ``os.environ``. A value that does
not parse is a start-up error naming the variable, never a silent default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SERVICE_NAMES = ("auth", "gateway", "chat", "rag", "ingest")
"""The five services of the mesh, in port order."""

DEFAULT_PORTS = {
    "auth": 50051,
    "gateway": 50052,
    "chat": 50053,
    "rag": 50054,
    "ingest": 50055,
}
"""Each service's default gRPC port; ``JANNA_{NAME}_PORT`` overrides it."""

DEFAULT_METRICS_PORTS = {name: 9101 + index for index, name in enumerate(SERVICE_NAMES)}
"""Each service's default Prometheus port; ``JANNA_{NAME}_METRICS_PORT``."""


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


class Env:
    """Typed access to one snapshot of the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)

    def text(self, name: str, default: str) -> str:
        return self._environ.get(name, default)

    def optional(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int) -> int:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc

    def number(self, name: str, default: float) -> float:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return float(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from exc

    def flag(self, name: str, default: bool) -> bool:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def items(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = self._environ.get(name)
        if raw is None:
            return default
        return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class ServerConfig:
    """How one service listens and finds its peers."""

    name: str
    """Which service this process is: auth, gateway, chat, rag or ingest."""
    host: str
    """Interface the gRPC server binds (``JANNA_GRPC_HOST``, default 127.0.0.1)."""
    port: int
    """gRPC port (``JANNA_{NAME}_PORT``; 0 picks a free one)."""
    peers: Mapping[str, str]
    """Every service's address, ``host:port`` (``JANNA_{NAME}_ADDR``)."""
    env: str
    """``JANNA_ENV``: development or production."""
    grace_s: float
    """``JANNA_SHUTDOWN_GRACE_S``: how long in-flight calls may finish on SIGTERM."""
    data_dir: Path
    """``JANNA_DATA_DIR``: where a service may keep files (default .janna/data)."""
    metrics_host: str
    """``JANNA_METRICS_HOST``: interface of the Prometheus endpoint (127.0.0.1)."""
    metrics_port: int
    """``JANNA_{NAME}_METRICS_PORT``: its port (9101…9105; 0 picks a free one)."""

    @classmethod
    def from_env(cls, name: str, env: Env) -> ServerConfig:
        if name not in SERVICE_NAMES:
            raise ConfigError(f"unknown service {name!r}")
        peers = {
            peer: env.text(
                f"JANNA_{peer.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[peer]}"
            )
            for peer in SERVICE_NAMES
        }
        return cls(
            name=name,
            host=env.text("JANNA_GRPC_HOST", "127.0.0.1"),
            port=env.integer(f"JANNA_{name.upper()}_PORT", DEFAULT_PORTS[name]),
            peers=peers,
            env=env.text("JANNA_ENV", "production"),
            grace_s=env.number("JANNA_SHUTDOWN_GRACE_S", 10.0),
            data_dir=Path(env.text("JANNA_DATA_DIR", ".janna/data")),
            metrics_host=env.text("JANNA_METRICS_HOST", "127.0.0.1"),
            metrics_port=env.integer(
                f"JANNA_{name.upper()}_METRICS_PORT", DEFAULT_METRICS_PORTS[name]
            ),
        )


@dataclass(frozen=True)
class DatabaseConfig:
    """Where Postgres is and what the vector column looks like."""

    url: str = field(repr=False)
    """``DATABASE_URL``; kept out of ``repr`` since it may carry a password."""
    embedding_dim: int
    """``JANNA_EMBEDDING_DIM``: 384 for the local model, 1536 for OpenAI's."""
    pool_min: int
    """``JANNA_DB_POOL_MIN``: connections kept open."""
    pool_max: int
    """``JANNA_DB_POOL_MAX``: the most connections one process opens."""
    statement_cache_size: int = 100
    """``JANNA_DB_STATEMENT_CACHE_SIZE``: prepared statements asyncpg keeps per
    connection; 0 behind PgBouncer in transaction mode."""

    @classmethod
    def from_env(cls, env: Env) -> DatabaseConfig:
        url = env.optional("DATABASE_URL")
        if url is None:
            raise ConfigError("DATABASE_URL is not set")
        config = cls(
            url=url,
            embedding_dim=env.integer("JANNA_EMBEDDING_DIM", 384),
            pool_min=env.integer("JANNA_DB_POOL_MIN", 1),
            pool_max=env.integer("JANNA_DB_POOL_MAX", 10),
            statement_cache_size=env.integer("JANNA_DB_STATEMENT_CACHE_SIZE", 100),
        )
        if config.statement_cache_size < 0:
            raise ConfigError("JANNA_DB_STATEMENT_CACHE_SIZE must not be negative")
        return config


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis (or Valkey) is."""

    url: str = field(repr=False)
    """``REDIS_URL``, default redis://127.0.0.1:6379/0."""

    @classmethod
    def from_env(cls, env: Env) -> RedisConfig:
        return cls(url=env.text("REDIS_URL", "redis://127.0.0.1:6379/0"))
