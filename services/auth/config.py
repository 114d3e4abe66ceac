"""The auth service's settings: identity provider, dev tokens, caches, the IP limit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

DEVELOPMENT = "development"


@dataclass(frozen=True)
class AuthConfig:
    """Who may call, how tokens are checked, and how often the edge may be asked."""

    issuer: str | None
    """``COGNITO_ISSUER``: the user pool URL, which a JWT's ``iss`` must equal.
    Required outside development; without it only dev tokens are accepted."""
    jwks_url: str | None
    """``JANNA_JWKS_URL``, default ``{issuer}/.well-known/jwks.json``."""
    client_id: str | None
    """``COGNITO_CLIENT_ID``: when set, an ID token's ``aud`` and an access
    token's ``client_id`` must equal it."""
    leeway_s: int
    """``JANNA_JWT_LEEWAY_S``: clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    jwks_refetch_interval_s: float
    """``JANNA_JWKS_REFETCH_INTERVAL_S``: the JWKS is fetched at most once per
    this interval, however many unknown ``kid``s arrive."""
    jwks_max_age_s: float
    """``JANNA_JWKS_MAX_AGE_S``: keys older than this are refreshed on next use
    (and kept if the refresh fails), so a key removed from the pool stops
    working."""
    jwks_timeout_s: float
    """``JANNA_JWKS_TIMEOUT_S``: one JWKS request's time limit."""
    dev_tokens: bool
    """Whether ``dev:USERID:EMAIL`` tokens are accepted: only when
    ``JANNA_ENV=development``."""
    dev_admins: tuple[str, ...]
    """``JANNA_DEV_ADMINS``: comma-separated user ids that are admins in
    development."""
    user_cache_ttl_s: float
    """``JANNA_USER_CACHE_TTL_S``: how long a user's disabled flag is trusted
    without asking Postgres. Changes reach every replica at once through Redis;
    this is the safety net, and also how often last-seen times advance."""
    api_rate_limit: int
    """``JANNA_API_RATE_LIMIT``: requests one IP address may make per window."""
    api_rate_window_s: float
    """``JANNA_API_RATE_WINDOW_S``: the sliding window of that limit."""

    @classmethod
    def from_env(cls, env: Env, janna_env: str) -> AuthConfig:
        issuer = env.optional("COGNITO_ISSUER")
        if issuer is not None:
            issuer = issuer.rstrip("/")
        development = janna_env == DEVELOPMENT
        if issuer is None and not development:
            raise ConfigError(
                "COGNITO_ISSUER is not set: outside development it is the only "
                "way to sign in"
            )
        jwks_url = env.optional("JANNA_JWKS_URL")
        if jwks_url is None and issuer is not None:
            jwks_url = f"{issuer}/.well-known/jwks.json"
        config = cls(
            issuer=issuer,
            jwks_url=jwks_url,
            client_id=env.optional("COGNITO_CLIENT_ID"),
            leeway_s=env.integer("JANNA_JWT_LEEWAY_S", 30),
            jwks_refetch_interval_s=env.number("JANNA_JWKS_REFETCH_INTERVAL_S", 60.0),
            jwks_max_age_s=env.number("JANNA_JWKS_MAX_AGE_S", 3600.0),
            jwks_timeout_s=env.number("JANNA_JWKS_TIMEOUT_S", 0.5),
            dev_tokens=development,
            dev_admins=env.items("JANNA_DEV_ADMINS", ("admin",)),
            user_cache_ttl_s=env.number("JANNA_USER_CACHE_TTL_S", 10.0),
            api_rate_limit=env.integer("JANNA_API_RATE_LIMIT", 200),
            api_rate_window_s=env.number("JANNA_API_RATE_WINDOW_S", 10.0),
        )
        config.check()
        return config

    def check(self) -> None:
        """Raises :class:`ConfigError` for values that cannot work."""
        if self.leeway_s < 0 or self.leeway_s > 300:
            raise ConfigError("JANNA_JWT_LEEWAY_S must be between 0 and 300")
        if self.jwks_refetch_interval_s < 0:
            raise ConfigError("JANNA_JWKS_REFETCH_INTERVAL_S must not be negative")
        if self.jwks_timeout_s <= 0:
            raise ConfigError("JANNA_JWKS_TIMEOUT_S must be positive")
        if self.user_cache_ttl_s < 0:
            raise ConfigError("JANNA_USER_CACHE_TTL_S must not be negative")
        if self.api_rate_limit < 1:
            raise ConfigError("JANNA_API_RATE_LIMIT must be at least 1")
        if self.api_rate_window_s < 0.001:
            raise ConfigError("JANNA_API_RATE_WINDOW_S must be positive")
