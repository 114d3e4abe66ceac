"""Envoy's ext_authz check: may this request pass the edge, and as whom.

Envoy asks about every request except ``/health`` and CORS preflights. A
request is admitted with ``x-user-id``, ``x-user-email`` and
``x-user-groups`` set (the edge has already dropped any a client sent), and
its ``Authorization`` header removed, since no service needs the token. A
refusal is 401 (no valid token) or 403 (disabled user, or a non-admin on an
admin path), with the same JSON body the transcoder gives any gRPC error.
When the check cannot be made (Postgres or the identity provider away) the
call fails, and the edge answers 503.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import urllib.parse

import grpc
from envoy.config.core.v3 import (  # type: ignore[import-untyped]  # xds-protos ships no stubs
    base_pb2,
)
from envoy.service.auth.v3 import (  # type: ignore[import-untyped]  # as above
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from envoy.type.v3 import (  # type: ignore[import-untyped]  # as above
    http_status_pb2,
)
from google.rpc import status_pb2

from services.auth import metrics
from services.auth.tokens import KeysUnavailable, TokenError, Verifier
from services.auth.users import StoreError, UserStates
from services.proto.janna.v1 import admin_pb2
from services.runtime import errors, logs
from services.runtime.channels import REQUEST_ID_HEADER
from services.runtime.identity import Caller

logger = logging.getLogger(__name__)

ADMIN_HTTP_PREFIX = "/api/admin/"
ADMIN_GRPC_PREFIXES = tuple(
    f"/{service.full_name}/".lower()
    for service in admin_pb2.DESCRIPTOR.services_by_name.values()
)
"""Every service of admin.proto, as a client could call it as gRPC through the edge."""

_SLASHES = re.compile(r"/+")
_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


def needs_admin(path: str) -> bool:
    """Whether a request path (query included) is an admin path.

    Envoy has normalised the path already; decoding and folding it once more
    only widens what counts as admin, never narrows it.
    """
    bare = urllib.parse.unquote(path.partition("?")[0]).lower()
    bare = posixpath.normpath(_SLASHES.sub("/", bare or "/"))
    return (bare + "/").startswith((ADMIN_HTTP_PREFIX, *ADMIN_GRPC_PREFIXES))


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=_OVERWRITE,
        keep_empty_value=True,
    )


def _deny(
    code: grpc.StatusCode, http_status: int, message: str, reason: str
) -> external_auth_pb2.CheckResponse:
    # The shape the transcoder renders a google.rpc.Status in.
    body = {
        "code": code.value[0],
        "message": message,
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": errors.DOMAIN,
            }
        ],
    }
    headers = [_header("content-type", "application/json")]
    if http_status == http_status_pb2.Unauthorized:
        headers.append(_header("www-authenticate", "Bearer"))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code.value[0], message=message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),
            headers=headers,
            body=json.dumps(body, separators=(",", ":")),
        ),
    )


def _with_request_id(
    denial: external_auth_pb2.CheckResponse,
) -> external_auth_pb2.CheckResponse:
    """The refusal with the request's id in its body, when there is one.

    Beside ``code``, ``message`` and ``details``, as ``requestId``: the
    transcoder's shape, whose ErrorInfo stays exactly what the refusal was.
    """
    request_id = logs.REQUEST_ID.get()
    if not request_id:
        return denial
    body = json.loads(denial.denied_response.body)
    body["requestId"] = request_id
    copy = external_auth_pb2.CheckResponse()
    copy.CopyFrom(denial)
    copy.denied_response.body = json.dumps(body, separators=(",", ":"))
    return copy


def _allow(caller: Caller) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc.StatusCode.OK.value[0]),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(key, value) for key, value in caller.metadata()],
            headers_to_remove=["authorization"],
        ),
    )


UNAUTHENTICATED = _deny(
    grpc.StatusCode.UNAUTHENTICATED,
    http_status_pb2.Unauthorized,
    "authentication required",
    "UNAUTHENTICATED",
)
USER_DISABLED = _deny(
    grpc.StatusCode.PERMISSION_DENIED,
    http_status_pb2.Forbidden,
    "this account is disabled",
    "USER_DISABLED",
)
ADMIN_REQUIRED = _deny(
    grpc.StatusCode.PERMISSION_DENIED,
    http_status_pb2.Forbidden,
    "admin access required",
    "ADMIN_REQUIRED",
)


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's ``envoy.service.auth.v3.Authorization``, for the edge."""

    def __init__(self, verifier: Verifier, states: UserStates) -> None:
        self._verifier = verifier
        self._states = states

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[
            external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse
        ],
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        # Envoy sends the request's id among the headers when its config lets
        # it; the call's own metadata, which the access log read, has none.
        request_id = http.headers.get(REQUEST_ID_HEADER, "")
        if request_id:
            logs.REQUEST_ID.set(request_id)
        # Never the query string: it is the client's, and may hold anything.
        where = f"{http.method} {http.path.partition('?')[0]}"
        try:
            caller = await self._verifier.caller(http.headers.get("authorization", ""))
            disabled = await self._states.disabled(caller)
        except TokenError as exc:
            logger.info("refused %s: %s", where, exc)
            metrics.DENIED.labels("UNAUTHENTICATED").inc()
            return _with_request_id(UNAUTHENTICATED)
        except (KeysUnavailable, StoreError) as exc:
            logger.warning("cannot decide on %s: %s", where, exc)
            metrics.DENIED.labels("AUTH_UNAVAILABLE").inc()
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "authentication is unavailable",
                "AUTH_UNAVAILABLE",
            )
        if disabled:
            logger.info("refused disabled user %s", caller.user_id)
            metrics.DENIED.labels("USER_DISABLED").inc()
            return _with_request_id(USER_DISABLED)
        if needs_admin(http.path) and not caller.is_admin:
            logger.info("refused non-admin %s on %s", caller.user_id, where)
            metrics.DENIED.labels("ADMIN_REQUIRED").inc()
            return _with_request_id(ADMIN_REQUIRED)
        metrics.ALLOWED.inc()
        return _allow(caller)
