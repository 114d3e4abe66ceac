"""Verifying callers: Cognito JWTs against a JWKS served over HTTP, and dev tokens.

Each case goes through the auth service's real ``Check``, as Envoy calls it,
with the service's real servicers on an in-process gRPC server, real
Postgres and Redis from the stack, and a JWKS over real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest

from services.auth.users import StoreError, UserStore
from services.runtime.identity import Caller
from tests.auth.conftest import (
    CLIENT_ID,
    AuthFactory,
    IdentityProvider,
    new_key,
    public_pem,
)

UNAUTHENTICATED_BODY = {
    "code": 16,
    "message": "authentication required",
    "details": [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "UNAUTHENTICATED",
            "domain": "janna",
        }
    ],
}


def production(idp: IdentityProvider, **extra: str) -> dict[str, str]:
    return {
        "JANNA_ENV": "production",
        "COGNITO_ISSUER": idp.issuer,
        "COGNITO_CLIENT_ID": CLIENT_ID,
        **extra,
    }


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64json(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def headers_of(reply: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in reply.ok_response.headers}


def assert_unauthenticated(reply: Any) -> None:
    assert reply.WhichOneof("http_response") == "denied_response", reply
    assert reply.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert reply.denied_response.status.code == 401
    # The same body for every failure: nothing says which check failed.
    assert json.loads(reply.denied_response.body) == UNAUTHENTICATED_BODY


# --- what is accepted ----------------------------------------------------------


async def test_a_valid_token_is_accepted(
    idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    auth = await auth_service(production(idp))
    token = idp.token(email="ada@example.test", **{"cognito:groups": ["admin"]})

    reply = await auth.check(f"Bearer {token}")

    assert reply.WhichOneof("http_response") == "ok_response", reply
    assert reply.status.code == 0
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert headers_of(reply) == {
        "x-user-id": claims["sub"],
        "x-user-email": "ada@example.test",
        "x-user-groups": "admin",
    }
    assert list(reply.ok_response.headers_to_remove) == ["authorization"]


async def test_an_access_token_for_this_client_is_accepted(
    idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    auth = await auth_service(production(idp))
    token = idp.token(
        token_use="access",
        aud=None,
        client_id=CLIENT_ID,
        email=None,
        at_hash=None,
        email_verified=None,
        scope="aws.cognito.signin.user.admin",
        username="someone",
        **{"cognito:username": None},
    )

    reply = await auth.check(f"Bearer {token}")

    assert reply.WhichOneof("http_response") == "ok_response", reply
    assert headers_of(reply)["x-user-groups"] == ""


async def test_a_rotated_key_is_accepted_and_cached_keys_outlive_the_idp(
    idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    auth = await auth_service(production(idp, JANNA_JWKS_REFETCH_INTERVAL_S="0.3"))
    old_kid = next(iter(idp.published))
    assert (await auth.check(f"Bearer {idp.token()}")).HasField("ok_response")

    new_kid = idp.publish()
    await asyncio.sleep(0.35)
    rotated = await auth.check(f"Bearer {idp.token(kid=new_kid)}")

    assert rotated.HasField("ok_response"), rotated
    # The identity provider goes away; both keys it served keep working.
    idp.down = True
    hits = idp.hits
    for kid in (old_kid, new_kid):
        reply = await auth.check(f"Bearer {idp.token(kid=kid)}")
        assert reply.HasField("ok_response"), reply
    assert idp.hits == hits


async def test_dev_tokens_work_in_development(auth_service: AuthFactory) -> None:
    auth = await auth_service({"JANNA_ENV": "development"})

    user = await auth.check("Bearer dev:alice:alice@dev.local")
    admin = await auth.check("Bearer dev:admin:admin@dev.local")

    assert headers_of(user) == {
        "x-user-id": "alice",
        "x-user-email": "alice@dev.local",
        "x-user-groups": "",
    }
    assert headers_of(admin)["x-user-groups"] == "admin"


# --- what is refused -----------------------------------------------------------


def _expired(idp: IdentityProvider) -> str:
    now = int(time.time())
    return f"Bearer {idp.token(iat=now - 7200, exp=now - 3600)}"


def _not_yet_valid(idp: IdentityProvider) -> str:
    return f"Bearer {idp.token(nbf=int(time.time()) + 600)}"


def _issued_in_the_future(idp: IdentityProvider) -> str:
    return f"Bearer {idp.token(iat=int(time.time()) + 600)}"


def _wrong_issuer(idp: IdentityProvider) -> str:
    other = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other"
    return f"Bearer {idp.token(iss=other)}"


def _wrong_audience(idp: IdentityProvider) -> str:
    return f"Bearer {idp.token(aud='another-client')}"


def _access_token_of_another_client(idp: IdentityProvider) -> str:
    token = idp.token(token_use="access", aud=None, client_id="another-client")
    return f"Bearer {token}"


def _not_an_access_or_id_token(idp: IdentityProvider) -> str:
    return f"Bearer {idp.token(token_use='refresh')}"


def _signed_by_a_key_not_in_the_jwks(idp: IdentityProvider) -> str:
    # Names a published kid, but the signature is another key's.
    return f"Bearer {idp.token(key=new_key())}"


def _alg_none(idp: IdentityProvider) -> str:
    kid = next(iter(idp.published))
    header = b64json({"alg": "none", "typ": "JWT", "kid": kid})
    return f"Bearer {header}.{b64json(idp.claims())}."


def _hs256_keyed_with_the_public_key(idp: IdentityProvider) -> str:
    kid, key = next(iter(idp.published.items()))
    signing_input = (
        f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64json(idp.claims())}"
    )
    mac = hmac.new(public_pem(key), signing_input.encode(), hashlib.sha256)
    return f"Bearer {signing_input}.{b64(mac.digest())}"


def _unknown_kid(idp: IdentityProvider) -> str:
    return f"Bearer {idp.token(kid='kid-made-up', key=new_key())}"


REFUSED_JWTS: dict[str, Callable[[IdentityProvider], str | None]] = {
    "expired": _expired,
    "not yet valid": _not_yet_valid,
    "issued in the future": _issued_in_the_future,
    "wrong issuer": _wrong_issuer,
    "wrong audience": _wrong_audience,
    "access token of another client": _access_token_of_another_client,
    "not an access or id token": _not_an_access_or_id_token,
    "signed by a key not in the jwks": _signed_by_a_key_not_in_the_jwks,
    "alg none": _alg_none,
    "hs256 keyed with the public key": _hs256_keyed_with_the_public_key,
    "unknown kid": _unknown_kid,
    "garbage": lambda _idp: "Bearer garbage",
    "garbage in three parts": lambda _idp: "Bearer a.b.c",
    "missing header": lambda _idp: None,
    "empty bearer": lambda _idp: "Bearer ",
    "basic credentials": lambda _idp: "Basic YWxpY2U6c2VjcmV0",
    "dev token outside development": lambda _idp: "Bearer dev:alice:a@dev.local",
}


@pytest.mark.parametrize("case", REFUSED_JWTS)
async def test_a_bad_token_is_refused_with_401(
    case: str, idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    auth = await auth_service(production(idp))
    # Valid first, so the refusal is not down to an empty key cache.
    assert (await auth.check(f"Bearer {idp.token()}")).HasField("ok_response")

    reply = await auth.check(REFUSED_JWTS[case](idp))

    assert_unauthenticated(reply)


@pytest.mark.parametrize(
    "token",
    ["dev:alice", "dev:alice:", "dev::alice@dev.local", "dev:a:b:c", "dev:", "dev"],
)
async def test_a_dev_token_with_a_missing_part_is_refused(
    token: str, auth_service: AuthFactory
) -> None:
    auth = await auth_service({"JANNA_ENV": "development"})

    assert_unauthenticated(await auth.check(f"Bearer {token}"))


async def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(
    idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    auth = await auth_service(production(idp, JANNA_JWKS_REFETCH_INTERVAL_S="2"))
    assert (await auth.check(f"Bearer {idp.token()}")).HasField("ok_response")
    assert idp.hits == 1
    await asyncio.sleep(2.05)

    stranger = new_key()
    made_up = [
        f"Bearer {idp.token(kid=f'kid-{uuid.uuid4().hex}', key=stranger)}"
        for _ in range(100)
    ]
    replies = await asyncio.gather(*(auth.check(header) for header in made_up))

    for reply in replies:
        assert_unauthenticated(reply)
    assert idp.hits == 2
    # A key published now is not fetched before the interval is over.
    kid = idp.publish()
    assert_unauthenticated(await auth.check(f"Bearer {idp.token(kid=kid)}"))
    assert idp.hits == 2


async def test_no_keys_at_all_is_unavailable_not_401(
    idp: IdentityProvider, auth_service: AuthFactory
) -> None:
    idp.down = True
    auth = await auth_service(production(idp))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auth.check(f"Bearer {idp.token()}")

    # Envoy turns a failed check into 503 (see the edge tests).
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_postgres_errors_become_store_errors(database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    store = UserStore(pool)
    await pool.close()

    with pytest.raises(StoreError):
        await store.record(Caller(user_id="u", email="", groups=()))
