"""``GET /api/me`` and the user admin calls, served from the users table."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

import grpc

from services.auth.users import (
    BadPageToken,
    StoreError,
    UserRow,
    UserStates,
    UserStore,
    decode_page_token,
    encode_page_token,
)
from services.proto.janna.v1 import admin_pb2, admin_pb2_grpc, auth_pb2, auth_pb2_grpc
from services.runtime import errors, identity
from services.runtime.identity import Caller

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

Context: TypeAlias = "grpc.aio.ServicerContext[object, object]"


@asynccontextmanager
async def _boundary(context: Context) -> AsyncIterator[None]:
    """Where this module's errors become gRPC statuses."""
    try:
        yield
    except StoreError as exc:
        logger.warning("user store unavailable: %s", exc)
        await errors.abort(
            context, grpc.StatusCode.UNAVAILABLE, "users are unavailable", "STORE"
        )
    except BadPageToken as exc:
        await errors.abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "BAD_PAGE_TOKEN"
        )


def _user(row: UserRow) -> auth_pb2.User:
    user = auth_pb2.User(
        id=row.id,
        email=row.email,
        groups=row.groups,
        admin=identity.ADMIN_GROUP in row.groups,
        disabled=row.disabled,
    )
    user.created_at.FromDatetime(row.created_at)
    user.last_seen_at.FromDatetime(row.last_seen_at)
    return user


def _me(caller: Caller, row: UserRow | None) -> auth_pb2.User:
    # Groups and admin come from the token, as the edge saw it; the row adds
    # what only the table knows.
    user = _user(row) if row is not None else auth_pb2.User(id=caller.user_id)
    user.email = caller.email or user.email
    del user.groups[:]
    user.groups.extend(caller.groups)
    user.admin = caller.is_admin
    return user


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    """``janna.v1.AuthService``: who the caller is."""

    def __init__(self, store: UserStore) -> None:
        self._store = store

    async def GetMe(
        self, request: auth_pb2.GetMeRequest, context: Context
    ) -> auth_pb2.User:
        caller = await identity.caller(context)
        async with _boundary(context):
            row = await self._store.get(caller.user_id)
        return _me(caller, row)


class UserAdmin(admin_pb2_grpc.UserAdminServicer):
    """``janna.v1.UserAdmin``: listing, disabling and enabling users."""

    def __init__(self, store: UserStore, states: UserStates) -> None:
        self._store = store
        self._states = states

    async def ListUsers(
        self, request: admin_pb2.ListUsersRequest, context: Context
    ) -> admin_pb2.ListUsersResponse:
        await identity.admin(context)
        if request.page_size < 0:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_size must not be negative",
                "BAD_PAGE_SIZE",
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        async with _boundary(context):
            after = (
                decode_page_token(request.page_token) if request.page_token else None
            )
            rows = await self._store.list(size + 1, after)
        reply = admin_pb2.ListUsersResponse(users=[_user(r) for r in rows[:size]])
        if len(rows) > size:
            reply.next_page_token = encode_page_token(rows[size - 1])
        return reply

    async def DisableUser(
        self, request: admin_pb2.SetUserStateRequest, context: Context
    ) -> auth_pb2.User:
        return await self._set(request, context, disabled=True)

    async def EnableUser(
        self, request: admin_pb2.SetUserStateRequest, context: Context
    ) -> auth_pb2.User:
        return await self._set(request, context, disabled=False)

    async def _set(
        self, request: admin_pb2.SetUserStateRequest, context: Context, disabled: bool
    ) -> auth_pb2.User:
        admin = await identity.admin(context)
        if not request.user_id:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "user_id is required"
            )
        async with _boundary(context):
            row = await self._states.set_disabled(request.user_id, disabled)
        if row is None:
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, "no such user", "USER_NOT_FOUND"
            )
        logger.info(
            "user %s %s by %s",
            row.id,
            "disabled" if disabled else "enabled",
            admin.user_id,
        )
        return _user(row)
