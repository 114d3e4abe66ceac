"""Fixtures of the auth tests: an identity provider over real HTTP, the auth service."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import httpx
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from jose import jwk, jwt

from devstack.stack import Stack
from services.auth.config import AuthConfig
from services.auth.service import servicers
from services.runtime import kv
from services.runtime.config import Env, RedisConfig

CLIENT_ID = "janna-web-client"


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class IdentityProvider:
    """A Cognito user pool as far as Janna sees one: a JWKS URL and signed tokens."""

    base_url: str = ""
    published: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    """kid -> private key; the public halves are what the JWKS serves."""
    hits: int = 0
    """Requests the JWKS URL has answered (or refused while down)."""
    down: bool = False
    """While set, the JWKS URL answers 503."""

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/us-east-1_TestPool"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def publish(self, key: rsa.RSAPrivateKey | None = None) -> str:
        """Adds a signing key to the JWKS; returns its kid."""
        kid = f"kid-{uuid.uuid4().hex[:12]}"
        self.published[kid] = key or new_key()
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.published.items():
            public = jwk.construct(public_pem(key), "RS256").to_dict()
            keys.append({**public, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        # An ID token as Cognito issues it, claims it does not check included.
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "token_use": "id",
            "email": "someone@example.test",
            "email_verified": True,
            "cognito:username": "someone",
            "cognito:groups": [],
            "at_hash": "b3nKd5y0Ck2T6gRyl8e1qw",
            "jti": str(uuid.uuid4()),
            "origin_jti": str(uuid.uuid4()),
            "event_id": str(uuid.uuid4()),
            "iat": now,
            "auth_time": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        **overrides: Any,
    ) -> str:
        """A token signed RS256; by the first published key unless told."""
        kid = kid or next(iter(self.published))
        signer = key or self.published[kid]
        return str(
            jwt.encode(
                self.claims(**overrides),
                private_pem(signer).decode(),
                algorithm="RS256",
                headers={"kid": kid},
            )
        )


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.publish()

    async def jwks(_request: web.Request) -> web.Response:
        provider.hits += 1
        if provider.down:
            return web.Response(status=503, text="down for maintenance")
        return web.json_response(provider.jwks())

    app = web.Application()
    app.router.add_get("/us-east-1_TestPool/.well-known/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    provider.base_url = f"http://127.0.0.1:{port}"
    yield provider
    await runner.cleanup()


@dataclass
class AuthUnderTest:
    """The auth service's real servicers on an in-process gRPC server."""

    config: AuthConfig
    channel: grpc.aio.Channel

    async def check(
        self, authorization: str | None, path: str = "/janna.v1.AuthService/GetMe"
    ) -> external_auth_pb2.CheckResponse:
        """What the service tells Envoy about a request with this header."""
        request = external_auth_pb2.CheckRequest()
        http = request.attributes.request.http
        http.method = "POST"
        http.path = path
        if authorization is not None:
            http.headers["authorization"] = authorization
        stub = external_auth_pb2_grpc.AuthorizationStub(self.channel)
        reply: external_auth_pb2.CheckResponse = await stub.Check(request, timeout=10)
        return reply


AuthFactory = Callable[[Mapping[str, str]], Awaitable[AuthUnderTest]]


@pytest_asyncio.fixture
async def auth_service(stack: Stack) -> AsyncIterator[AuthFactory]:
    """Starts auth services configured from the given environment variables."""
    assert stack.addresses is not None
    addresses = stack.addresses
    async with AsyncExitStack() as resources:

        async def start(environ: Mapping[str, str]) -> AuthUnderTest:
            env = Env(dict(environ))
            config = AuthConfig.from_env(env, env.text("JANNA_ENV", "production"))
            pool = await asyncpg.create_pool(
                addresses.database_url, min_size=1, max_size=4
            )
            resources.push_async_callback(pool.close)
            redis_client = kv.connect(RedisConfig(url=addresses.redis_url))
            resources.push_async_callback(redis_client.aclose)
            http = httpx.AsyncClient(follow_redirects=False)
            resources.push_async_callback(http.aclose)
            server = grpc.aio.server()
            resources.push_async_callback(server.stop, None)
            for servicer in await servicers(
                config, pool, redis_client, http, resources
            ):
                servicer.add(servicer.impl, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            resources.push_async_callback(channel.close)
            return AuthUnderTest(config, channel)

        yield start
