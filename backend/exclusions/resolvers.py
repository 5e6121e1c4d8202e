import strawberry

from backend.contacts.resolvers import DeletePayload
from backend.exclusions import access, queries, service
from backend.exclusions.types import Exclusion, ExclusionConnection
from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_viewer, user_errors
from backend.graphql.inputs import required_id
from backend.graphql.relay import connection, page_request
from backend.kit.errors import ServiceError
from backend.kit.pagination import count


@strawberry.input
class AddExclusionInput:
    value: str
    purge_existing: bool | None = False


@strawberry.type
class ExclusionPayload:
    exclusion: Exclusion | None
    user_errors: list[UserError]


@strawberry.type
class ExclusionQuery:
    @strawberry.field(description="OWNER/ADMIN: all; USER: those they added")
    async def exclusions(
        self, info: Info, first: int | None = 50, after: str | None = None
    ) -> ExclusionConnection:
        viewer = require_viewer(info)
        session = info.context.session
        stmt = queries.visible_exclusions(viewer.workspace_id, access.listed_creator(viewer))
        request = page_request(first, after, 50, info.context.runtime.settings.max_page_size)
        page = await queries.exclusions_page(session, stmt, request)
        return connection(
            ExclusionConnection,
            [Exclusion(row=e) for e in page.items],
            page,
            lambda: count(session, stmt),
        )


@strawberry.type
class ExclusionMutation:
    @strawberry.mutation
    async def add_exclusion(self, info: Info, input: AddExclusionInput) -> ExclusionPayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.add_exclusion(
                session, viewer, input.value, purge_existing=bool(input.purge_existing)
            ),
        )
        if isinstance(result, ServiceError):
            return ExclusionPayload(exclusion=None, user_errors=user_errors(result, ["input"]))
        return ExclusionPayload(exclusion=Exclusion(row=result), user_errors=[])

    @strawberry.mutation
    async def remove_exclusion(self, info: Info, id: strawberry.ID) -> DeletePayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.remove_exclusion(session, viewer, required_id(id, "Exclusion", ["id"])),
        )
        if isinstance(result, ServiceError):
            return DeletePayload(deleted_id=None, user_errors=user_errors(result))
        return DeletePayload(deleted_id=id, user_errors=[])
