"""Expected failures: userErrors in payloads, and the auth errors of the contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import strawberry
from graphql import GraphQLError

from backend.graphql.context import Info
from backend.kit.errors import Forbidden, ServiceError, ServiceErrors, catalogue

if TYPE_CHECKING:
    from backend.auth.service import Viewer

T = TypeVar("T")


@strawberry.type(description="A problem the user can fix, with a stable code to act on.")
class UserError:
    field: list[str] | None = strawberry.field(
        description="Path of the input field at fault, when one is."
    )
    message: str = strawberry.field(description="What went wrong, for a person to read.")
    code: str = strawberry.field(
        description="Stable machine code, one meaning each:\n" + catalogue()
    )


def unauthenticated() -> GraphQLError:
    return GraphQLError(
        "Authentication required: send `Authorization: Bearer <token>`.",
        extensions={"code": "UNAUTHENTICATED"},
    )


def forbidden(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "FORBIDDEN"})


def require_viewer(info: Info) -> Viewer:
    viewer = info.context.viewer
    if viewer is None:
        raise unauthenticated()
    return viewer


def require_admin(info: Info) -> Viewer:
    viewer = require_viewer(info)
    if not viewer.is_admin:
        raise forbidden("Only workspace owners and admins can do this.")
    return viewer


def user_errors(error: ServiceError, prefix: list[str] | None = None) -> list[UserError]:
    found = error.errors if isinstance(error, ServiceErrors) else [error]
    return [
        UserError(
            field=[*prefix, *e.field] if e.field is not None and prefix is not None else e.field,
            message=e.message,
            code=e.code,
        )
        for e in found
    ]


async def attempt(info: Info, action: Callable[[], Awaitable[T]]) -> T | ServiceError:
    """Run a mutation's service call in a savepoint: on a ServiceError nothing it wrote stays."""
    scope = info.context.scope
    effects = scope.effects
    marks = effects.marks()
    try:
        async with scope.session.begin_nested():
            return await action()
    except ServiceError as exc:
        # The savepoint undid the writes; the effects they queued must go with them.
        effects.drop_after(marks)
        if isinstance(exc, Forbidden):
            raise forbidden(exc.message) from exc
        return exc
