"""The caller of an RPC, as the edge vouched for them in metadata.

Envoy's ext_authz check puts ``x-user-id``, ``x-user-email`` and
``x-user-groups`` on every request it admits, after stripping any that a
client sent. Services read the caller only through :func:`caller`, and the
chat service forwards the same metadata when it calls rag or the gateway on
the user's behalf.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from services.runtime import errors

logger = logging.getLogger(__name__)

USER_ID = "x-user-id"
USER_EMAIL = "x-user-email"
USER_GROUPS = "x-user-groups"
ADMIN_GROUP = "admin"


@dataclass(frozen=True)
class Caller:
    """A user the edge has authenticated."""

    user_id: str
    email: str
    groups: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return ADMIN_GROUP in self.groups

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata that carries this caller on a call to another service."""
        return (
            (USER_ID, self.user_id),
            (USER_EMAIL, self.email),
            (USER_GROUPS, ",".join(self.groups)),
        )


def from_metadata(
    metadata: tuple[tuple[str, str | bytes], ...] | None,
) -> Caller | None:
    """The caller named in ``metadata``, or None when there is none."""
    values: dict[str, str] = {}
    for key, value in metadata or ():
        if key in (USER_ID, USER_EMAIL, USER_GROUPS) and isinstance(value, str):
            values[key] = value
    user_id = values.get(USER_ID, "").strip()
    if not user_id:
        return None
    groups = tuple(
        g.strip() for g in values.get(USER_GROUPS, "").split(",") if g.strip()
    )
    return Caller(user_id=user_id, email=values.get(USER_EMAIL, ""), groups=groups)


async def caller(context: grpc.aio.ServicerContext[object, object]) -> Caller:
    """The authenticated caller, or UNAUTHENTICATED when the call names none."""
    found = from_metadata(context.invocation_metadata())
    if found is None:
        await errors.abort(
            context, grpc.StatusCode.UNAUTHENTICATED, "authentication required"
        )
    return found


async def admin(context: grpc.aio.ServicerContext[object, object]) -> Caller:
    """The caller, who must be in the admin group."""
    found = await caller(context)
    if not found.is_admin:
        await errors.abort(
            context, grpc.StatusCode.PERMISSION_DENIED, "admin access required"
        )
    return found
