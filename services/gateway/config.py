"""The gateway's configuration: providers, routes, timeouts and embeddings.

Read once at start-up from the environment (and, for routes, optionally a YAML
file). A route is a named fallback chain of ``provider:model`` references::

    JANNA_MODEL_ROUTES='chat=local:llama-3.1-70b,openai:gpt-4o-mini;title=openai:gpt-4o-mini'

or, with ``JANNA_MODELS_FILE=models.yaml``::

    routes:
      chat: [local:llama-3.1-70b, openai:gpt-4o-mini]
      title: [openai:gpt-4o-mini]

With neither set, the ``chat`` route is built from the providers that are
configured (local, then OpenAI, then Anthropic), or is the embedded model
when none is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

PROVIDERS = ("local", "openai", "anthropic", "embedded")
"""Every provider the gateway knows; a route may name only these."""

DEFAULT_ROUTE = "chat"
"""The route a request with an empty model name takes."""

LOCAL_MODEL = "llama-3.1-70b"
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-haiku-4-5-20251001"
EMBEDDED_MODEL = "gemma-3-270m"
OPENAI_EMBEDDING_MODEL = "text-embedding-3-small"
LOCAL_EMBEDDING_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True, order=True)
class ModelRef:
    """One model of one provider, written ``provider:model``."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"

    @property
    def health_key(self) -> str:
        """The runbook's Redis key for this model's health."""
        return f"health:{self.provider}:{self.model}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        # Only the first colon separates: Ollama's names carry their own.
        provider, sep, model = text.strip().partition(":")
        if not sep or not provider or not model.strip():
            raise ConfigError(f"{text!r} is not provider:model")
        if provider not in PROVIDERS:
            raise ConfigError(
                f"unknown provider {provider!r} in {text!r}; "
                f"known: {', '.join(PROVIDERS)}"
            )
        return cls(provider, model.strip())


@dataclass(frozen=True)
class Endpoint:
    """Where one remote provider answers, and the key it wants."""

    base_url: str | None
    """The API's base URL; None means the SDK's default."""
    api_key: str = field(repr=False)
    """The provider's key; never logged, never in a ``repr``."""


@dataclass(frozen=True)
class EmbeddedConfig:
    """The in-process Gemma 3 270M model."""

    model_dir: Path
    """``JANNA_MODEL_CACHE_DIR``: converted weights (``{JANNA_DATA_DIR}/models``)."""
    max_tokens: int
    """``JANNA_EMBEDDED_MAX_TOKENS``: default answer length (default 256)."""
    workers: int
    """``JANNA_EMBEDDED_WORKERS``: generations that may run at once (default 2)."""
    max_prompt_tokens: int
    """``JANNA_EMBEDDED_MAX_PROMPT_TOKENS``: older context is cut (default 2048)."""


@dataclass(frozen=True)
class EmbeddingsConfig:
    """How texts become vectors."""

    provider: str
    """``JANNA_EMBEDDINGS_PROVIDER``: openai, or embedded (in-process MiniLM).

    Default: openai when ``OPENAI_API_KEY`` is set, else embedded."""
    batch_size: int
    """``JANNA_EMBED_BATCH_SIZE``: texts per upstream call (default 100)."""
    max_attempts: int
    """``JANNA_EMBED_MAX_ATTEMPTS``: tries per batch on 429/5xx (default 5)."""
    backoff_s: float
    """``JANNA_EMBED_BACKOFF_S``: first retry delay, doubled each time (0.5)."""
    backoff_max_s: float
    """``JANNA_EMBED_BACKOFF_MAX_S``: the longest single wait (default 20)."""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs besides its server and Redis settings."""

    routes: Mapping[str, tuple[ModelRef, ...]]
    """Route name to chain (``JANNA_MODEL_ROUTES`` or ``JANNA_MODELS_FILE``)."""
    local: Endpoint | None
    """``JANNA_LOCAL_BASE_URL`` (+ ``JANNA_LOCAL_API_KEY``): OpenAI-compatible."""
    openai: Endpoint | None
    """``OPENAI_API_KEY`` (+ optional ``OPENAI_BASE_URL``)."""
    anthropic: Endpoint | None
    """``ANTHROPIC_API_KEY`` (+ optional ``ANTHROPIC_BASE_URL``)."""
    health_ttl_s: float
    """``JANNA_HEALTH_TTL_S``: how long a failing model is skipped (default 30)."""
    ttft_limit_s: float
    """``JANNA_TTFT_LIMIT_S``: a remote model's time to first token (default 10)."""
    connect_timeout_s: float
    """``JANNA_CONNECT_TIMEOUT_S``: TCP/TLS connect to a provider (default 5)."""
    idle_timeout_s: float
    """``JANNA_STREAM_IDLE_TIMEOUT_S``: longest silence inside a stream (default 30)."""
    anthropic_max_tokens: int
    """``JANNA_ANTHROPIC_MAX_TOKENS``: Anthropic needs a limit (default 1024)."""
    embedded: EmbeddedConfig
    embeddings: EmbeddingsConfig

    @property
    def models(self) -> tuple[ModelRef, ...]:
        """Every model of every route, once each, in route order."""
        seen: dict[ModelRef, None] = {}
        for chain in self.routes.values():
            for ref in chain:
                seen.setdefault(ref, None)
        return tuple(seen)

    @classmethod
    def from_env(cls, env: Env, data_dir: Path) -> GatewayConfig:
        local = _endpoint(
            env, "JANNA_LOCAL_BASE_URL", "JANNA_LOCAL_API_KEY", local=True
        )
        openai = _endpoint(env, "OPENAI_BASE_URL", "OPENAI_API_KEY", local=False)
        anthropic = _endpoint(
            env, "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", local=False
        )

        routes = _routes(env)
        if routes is None:
            routes = {DEFAULT_ROUTE: _default_chain(local, openai, anthropic)}
        configured = {
            "local": local is not None,
            "openai": openai is not None,
            "anthropic": anthropic is not None,
            "embedded": True,
        }
        for name, chain in routes.items():
            for ref in chain:
                if not configured[ref.provider]:
                    raise ConfigError(
                        f"route {name!r} uses {ref} but provider {ref.provider!r} "
                        f"is not configured ({_PROVIDER_ENV[ref.provider]} is not set)"
                    )

        embeddings_provider = env.text(
            "JANNA_EMBEDDINGS_PROVIDER", "openai" if openai else "embedded"
        ).strip()
        if embeddings_provider not in ("openai", "embedded"):
            raise ConfigError(
                f"JANNA_EMBEDDINGS_PROVIDER must be openai or embedded, "
                f"got {embeddings_provider!r}"
            )
        if embeddings_provider == "openai" and openai is None:
            raise ConfigError("JANNA_EMBEDDINGS_PROVIDER=openai needs OPENAI_API_KEY")

        config = cls(
            routes=routes,
            local=local,
            openai=openai,
            anthropic=anthropic,
            health_ttl_s=_positive(env, "JANNA_HEALTH_TTL_S", 30.0),
            ttft_limit_s=_positive(env, "JANNA_TTFT_LIMIT_S", 10.0),
            connect_timeout_s=_positive(env, "JANNA_CONNECT_TIMEOUT_S", 5.0),
            idle_timeout_s=_positive(env, "JANNA_STREAM_IDLE_TIMEOUT_S", 30.0),
            anthropic_max_tokens=int(
                _positive(env, "JANNA_ANTHROPIC_MAX_TOKENS", 1024)
            ),
            embedded=EmbeddedConfig(
                model_dir=Path(
                    env.text("JANNA_MODEL_CACHE_DIR", str(data_dir / "models"))
                ).absolute(),
                max_tokens=int(_positive(env, "JANNA_EMBEDDED_MAX_TOKENS", 256)),
                workers=int(_positive(env, "JANNA_EMBEDDED_WORKERS", 2)),
                max_prompt_tokens=int(
                    _positive(env, "JANNA_EMBEDDED_MAX_PROMPT_TOKENS", 2048)
                ),
            ),
            embeddings=EmbeddingsConfig(
                provider=embeddings_provider,
                batch_size=int(_positive(env, "JANNA_EMBED_BATCH_SIZE", 100)),
                max_attempts=int(_positive(env, "JANNA_EMBED_MAX_ATTEMPTS", 5)),
                backoff_s=_positive(env, "JANNA_EMBED_BACKOFF_S", 0.5),
                backoff_max_s=_positive(env, "JANNA_EMBED_BACKOFF_MAX_S", 20.0),
            ),
        )
        for name, chain in config.routes.items():
            logger.info("route %s: %s", name, " -> ".join(map(str, chain)))
        return config


_PROVIDER_ENV = {
    "local": "JANNA_LOCAL_BASE_URL",
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "embedded": "",
}


def _endpoint(
    env: Env, url_name: str, key_name: str, *, local: bool
) -> Endpoint | None:
    base_url = env.optional(url_name)
    api_key = env.optional(key_name)
    if local:
        # A self-hosted server is configured by its URL; most want no key.
        return None if base_url is None else Endpoint(base_url, api_key or "none")
    return None if api_key is None else Endpoint(base_url, api_key)


def _default_chain(
    local: Endpoint | None, openai: Endpoint | None, anthropic: Endpoint | None
) -> tuple[ModelRef, ...]:
    chain = []
    if local is not None:
        chain.append(ModelRef("local", LOCAL_MODEL))
    if openai is not None:
        chain.append(ModelRef("openai", OPENAI_MODEL))
    if anthropic is not None:
        chain.append(ModelRef("anthropic", ANTHROPIC_MODEL))
    return tuple(chain) or (ModelRef("embedded", EMBEDDED_MODEL),)


def _routes(env: Env) -> dict[str, tuple[ModelRef, ...]] | None:
    inline = env.optional("JANNA_MODEL_ROUTES")
    path = env.optional("JANNA_MODELS_FILE")
    if inline is not None and path is not None:
        raise ConfigError("set JANNA_MODEL_ROUTES or JANNA_MODELS_FILE, not both")
    if inline is not None:
        routes = _parse_inline(inline)
    elif path is not None:
        routes = _parse_file(Path(path))
    else:
        return None
    if DEFAULT_ROUTE not in routes:
        raise ConfigError(f"the routes must include {DEFAULT_ROUTE!r}")
    return routes


def _parse_inline(text: str) -> dict[str, tuple[ModelRef, ...]]:
    routes: dict[str, tuple[ModelRef, ...]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, sep, chain = part.partition("=")
        if not sep:
            raise ConfigError(f"JANNA_MODEL_ROUTES: {part!r} is not name=chain")
        routes[_route_name(name)] = _chain(
            name, [item for item in chain.split(",") if item.strip()]
        )
    return routes


def _parse_file(path: Path) -> dict[str, tuple[ModelRef, ...]]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"JANNA_MODELS_FILE {path}: {exc}") from exc
    raw = document.get("routes") if isinstance(document, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError(f"JANNA_MODELS_FILE {path}: needs a 'routes' mapping")
    routes: dict[str, tuple[ModelRef, ...]] = {}
    for name, chain in raw.items():
        if not isinstance(chain, list) or not all(isinstance(i, str) for i in chain):
            raise ConfigError(
                f"{path}: route {name!r} must be a list of provider:model"
            )
        routes[_route_name(str(name))] = _chain(str(name), chain)
    return routes


def _route_name(name: str) -> str:
    name = name.strip()
    if not name or ":" in name:
        raise ConfigError(f"route name {name!r} must be a plain word")
    return name


def _chain(name: str, items: list[str]) -> tuple[ModelRef, ...]:
    chain = tuple(ModelRef.parse(item) for item in items)
    if not chain:
        raise ConfigError(f"route {name.strip()!r} has no models")
    if len(set(chain)) != len(chain):
        raise ConfigError(f"route {name.strip()!r} names a model twice")
    return chain


def _positive(env: Env, name: str, default: float) -> float:
    value = env.number(name, default)
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value
