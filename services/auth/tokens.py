"""Turning an ``Authorization`` header into a caller: Cognito JWTs and dev tokens.

A JWT must be RS256, signed by a key of the pool's JWKS, issued by the pool,
current, an access or ID token, and (when a client id is configured) meant
for this client. The JWKS is fetched over HTTP and cached; a token naming an
unknown ``kid`` triggers a refetch, but at most one per interval, so made-up
``kid``s cannot hammer the identity provider, and while it is down the keys
already fetched keep working.

Every way a token can fail raises the same :class:`TokenError`: the reason is
logged, never the token, and it never reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from jose import jwk, jwt
from jose.backends.base import Key
from jose.exceptions import JWKError, JWTError

from services.auth.config import AuthConfig
from services.runtime.identity import ADMIN_GROUP, Caller

logger = logging.getLogger(__name__)

ALGORITHM = "RS256"
TOKEN_USES = ("access", "id")
DEV_PREFIX = "dev:"
_MAX_TOKEN_CHARS = 8192
_MAX_ID_CHARS = 256


class TokenError(Exception):
    """The header proves nothing about who is calling."""


class KeysUnavailable(Exception):
    """No signing key was ever fetched, so no JWT can be checked at all."""


class Jwks:
    """The identity provider's signing keys, fetched lazily and cached."""

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        refetch_interval_s: float,
        max_age_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._http = http
        self._refetch_interval_s = refetch_interval_s
        self._max_age_s = max_age_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._keys: dict[str, Key] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._max_age_s

    def _may_fetch(self, now: float) -> bool:
        return (
            self._attempted_at is None
            or now - self._attempted_at >= self._refetch_interval_s
        )

    async def key(self, kid: str) -> Key | None:
        """The key named ``kid``, or None when the provider has no such key.

        Raises :class:`KeysUnavailable` when no key set was ever fetched.
        """
        found = self._keys.get(kid)
        if found is not None and self._fresh(self._clock()):
            return found
        async with self._lock:
            # Whoever held the lock may have fetched what this caller needs.
            now = self._clock()
            found = self._keys.get(kid)
            if (found is None or not self._fresh(now)) and self._may_fetch(now):
                await self._fetch()
            if self._fetched_at is None:
                raise KeysUnavailable(f"no keys fetched from {self._url} yet")
            return self._keys.get(kid)

    async def warm(self) -> None:
        """Fetches the keys ahead of the first token, if none are cached yet."""
        async with self._lock:
            if self._fetched_at is None and self._may_fetch(self._clock()):
                await self._fetch()

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        try:
            response = await self._http.get(self._url, timeout=self._timeout_s)
            response.raise_for_status()
            keys = _parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # The cached keys, if any, stay in use until the next attempt.
            logger.warning("jwks fetch from %s failed: %s", self._url, exc)
            return
        self._keys = keys
        self._fetched_at = self._clock()
        logger.info("jwks fetched: %d signing keys", len(keys))


def _parse_jwks(document: object) -> dict[str, Key]:
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set")
    keys: dict[str, Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        if (
            not isinstance(kid, str)
            or entry.get("kty") != "RSA"
            or entry.get("use", "sig") != "sig"
            or entry.get("alg", ALGORITHM) != ALGORITHM
        ):
            continue
        try:
            keys[kid] = jwk.construct(dict(entry), algorithm=ALGORITHM)
        except JWKError as exc:
            logger.warning("jwks key %s skipped: %s", kid, exc)
    if not keys:
        raise ValueError("no RS256 signing keys in the JWK set")
    return keys


class Verifier:
    """Checks bearer tokens; the one place that decides who a caller is."""

    def __init__(self, config: AuthConfig, jwks: Jwks | None) -> None:
        self._config = config
        self._jwks = jwks

    async def caller(self, authorization: str) -> Caller:
        """The caller an ``Authorization`` header value proves.

        Raises :class:`TokenError` for anything that is not a valid token, and
        :class:`KeysUnavailable` when JWTs cannot be checked at all.
        """
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenError("no bearer token")
        if len(token) > _MAX_TOKEN_CHARS:
            raise TokenError("token too long")
        if self._config.dev_tokens and token.startswith(DEV_PREFIX):
            return self._dev_caller(token)
        return await self._jwt_caller(token)

    def _dev_caller(self, token: str) -> Caller:
        parts = token.split(":")
        if len(parts) != 3 or not all(parts):
            raise TokenError("a dev token is dev:USERID:EMAIL")
        _, user_id, email = parts
        groups = (ADMIN_GROUP,) if user_id in self._config.dev_admins else ()
        return _checked(Caller(user_id=user_id, email=email, groups=groups))

    async def _jwt_caller(self, token: str) -> Caller:
        if self._jwks is None or self._config.issuer is None:
            raise TokenError("no identity provider is configured")
        try:
            header = jwt.get_unverified_header(token)
        except JWTError as exc:
            raise TokenError(f"malformed token: {exc}") from exc
        # Only RS256: never "none", never an HMAC keyed with a public key.
        if header.get("alg") != ALGORITHM:
            raise TokenError(
                f"algorithm {str(header.get('alg'))[:20]!r} is not accepted"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token names no key")
        key = await self._jwks.key(kid)
        if key is None:
            raise TokenError(f"unknown key id {kid[:40]!r}")
        leeway = self._config.leeway_s
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self._config.issuer,
                options={
                    # Cognito's access tokens carry client_id instead of aud;
                    # both are checked below.
                    "verify_aud": False,
                    # An ID token's at_hash binds it to the access token it
                    # came with, which a bearer of the ID token never shows.
                    "verify_at_hash": False,
                    "require_exp": True,
                    "require_iat": True,
                    "require_iss": True,
                    "require_sub": True,
                    "leeway": leeway,
                },
            )
        except JWTError as exc:
            raise TokenError(f"token rejected: {exc}") from exc
        return _checked(self._claims_caller(claims, time.time() + leeway))

    def _claims_caller(self, claims: Mapping[str, Any], latest: float) -> Caller:
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or iat > latest:
            raise TokenError("token issued in the future")
        use = claims.get("token_use")
        if use not in TOKEN_USES:
            raise TokenError(f"token_use {use!r} is not accepted")
        client_id = self._config.client_id
        if client_id is not None:
            audience = claims.get("aud") if use == "id" else claims.get("client_id")
            if audience != client_id:
                raise TokenError("token is for another client")
        subject = claims.get("sub")
        email = claims.get("email", "")
        groups = claims.get("cognito:groups", [])
        if not isinstance(subject, str) or not isinstance(email, str):
            raise TokenError("sub or email is not a string")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise TokenError("cognito:groups is not a list of strings")
        return Caller(user_id=subject, email=email, groups=tuple(groups))


def _checked(caller: Caller) -> Caller:
    # The caller travels in HTTP headers and gRPC metadata, which carry only
    # printable ASCII, and groups are joined with commas.
    texts = (caller.user_id, caller.email, *caller.groups)
    if not caller.user_id or any(
        len(text) > _MAX_ID_CHARS or not text.isascii() or not text.isprintable()
        for text in texts
    ):
        raise TokenError("identity is not printable ASCII")
    if any("," in group or not group.strip() for group in caller.groups):
        raise TokenError("a group name is empty or has a comma")
    return caller
