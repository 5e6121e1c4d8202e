import strawberry

from backend.auth import queries, tables
from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_admin, require_viewer, user_errors
from backend.kit.errors import ServiceError
from backend.mailboxes import queries as mailbox_queries
from backend.mailboxes.service import promote_waiting
from backend.mailboxes.types import Mailbox, UserConnectionStatus, health_of
from backend.workspaces import service
from backend.workspaces.types import (
    ContactAutoCreation,
    ContactMatching,
    User,
    Viewer,
    Workspace,
    WorkspaceSettings,
)


@strawberry.input
class UpdateWorkspaceSettingsInput:
    contact_matching: ContactMatching | None = None
    contact_auto_creation: ContactAutoCreation | None = None
    mailbox_limit: int | None = strawberry.UNSET
    label_synced_mail: bool | None = strawberry.field(
        default=None, description='Tag synced mail in the mailbox (a "CRM" label in Gmail).'
    )


@strawberry.type
class WorkspaceSettingsPayload:
    settings: WorkspaceSettings | None = strawberry.field(
        description="The same as `workspace.settings`, kept for older clients."
    )
    workspace: Workspace | None = strawberry.field(
        description="The workspace with its id, so normalized caches see the new settings."
    )
    user_errors: list[UserError]


@strawberry.type
class WorkspacePayload:
    workspace: Workspace | None
    user_errors: list[UserError]


@strawberry.type
class WorkspaceQuery:
    @strawberry.field
    def viewer(self, info: Info) -> Viewer:
        viewer = require_viewer(info)
        return Viewer(user=User(row=viewer.user), workspace=Workspace(row=viewer.workspace))

    @strawberry.field(description="OWNER/ADMIN only: each user's mailbox health.")
    async def connection_statuses(self, info: Info) -> list[UserConnectionStatus]:
        viewer = require_admin(info)
        session = info.context.session
        users = await queries.workspace_users(session, viewer.workspace_id)
        by_owner = await mailbox_queries.mailboxes_by_owner(
            session, viewer.workspace_id, [u.id for u in users]
        )
        return [
            UserConnectionStatus(
                user=User(row=u),
                health=health_of(by_owner.get(u.id, [])),
                mailboxes=[Mailbox(row=m) for m in by_owner.get(u.id, [])],
            )
            for u in users
        ]


@strawberry.type
class WorkspaceMutation:
    @strawberry.mutation
    async def update_workspace_settings(
        self, info: Info, input: UpdateWorkspaceSettingsInput
    ) -> WorkspaceSettingsPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        limit: object = (
            service.UNSET if input.mailbox_limit is strawberry.UNSET else input.mailbox_limit
        )

        async def update() -> tables.Workspace:
            workspace = await service.update_settings(
                scope.session,
                viewer,
                contact_matching=input.contact_matching,
                contact_auto_creation=input.contact_auto_creation,
                mailbox_limit=limit,
                label_synced_mail=input.label_synced_mail,
            )
            await promote_waiting(scope.session, workspace.id, scope.effects)
            return workspace

        result = await attempt(info, update)
        if isinstance(result, ServiceError):
            return WorkspaceSettingsPayload(
                settings=None, workspace=None, user_errors=user_errors(result, ["input"])
            )
        return WorkspaceSettingsPayload(
            settings=WorkspaceSettings(row=result), workspace=Workspace(row=result), user_errors=[]
        )

    @strawberry.mutation(
        description="OWNER/ADMIN: a new capture address; the old one stops working (R16)."
    )
    async def rotate_capture_address(self, info: Info) -> WorkspacePayload:
        viewer = require_viewer(info)
        scope = info.context.scope

        async def rotate() -> tables.Workspace:
            return await service.rotate_capture_address(scope.session, viewer)

        result = await attempt(info, rotate)
        if isinstance(result, ServiceError):
            return WorkspacePayload(workspace=None, user_errors=user_errors(result))
        return WorkspacePayload(workspace=Workspace(row=result), user_errors=[])
