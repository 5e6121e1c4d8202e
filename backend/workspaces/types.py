from typing import TYPE_CHECKING, Annotated

import strawberry

from backend.auth import tables
from backend.graphql.context import Info
from backend.graphql.relay import Node, to_global_id
from backend.mailboxes import access as mailbox_access
from backend.mailboxes import loaders as mailbox_loaders
from backend.workspaces.service import capture_address

if TYPE_CHECKING:
    from backend.mailboxes.types import Mailbox

Role = tables.Role
strawberry.enum(Role)
ContactMatching = tables.ContactMatching
strawberry.enum(ContactMatching)
ContactAutoCreation = tables.ContactAutoCreation
strawberry.enum(ContactAutoCreation)


@strawberry.type
class User(Node):
    row: strawberry.Private[tables.User]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("User", self.row.id)

    @strawberry.field
    def name(self) -> str:
        return self.row.name

    @strawberry.field
    def email(self) -> str:
        return self.row.email

    @strawberry.field
    def role(self) -> Role:
        return self.row.role

    @strawberry.field(description="This user's mailboxes; teammates' only for owners and admins.")
    async def mailboxes(
        self, info: Info
    ) -> list[Annotated["Mailbox", strawberry.lazy("backend.mailboxes.types")]]:
        from backend.mailboxes.types import Mailbox

        viewer = info.context.viewer
        if viewer is None or not mailbox_access.can_list_mailboxes_of(viewer, self.row.id):
            return []
        rows = await mailbox_loaders.mailboxes_of_owner(info).load(self.row.id)
        return [Mailbox(row=m) for m in rows]


@strawberry.type
class WorkspaceSettings:
    row: strawberry.Private[tables.Workspace]

    @strawberry.field
    def contact_matching(self) -> ContactMatching:
        return self.row.contact_matching

    @strawberry.field
    def contact_auto_creation(self) -> ContactAutoCreation:
        return self.row.contact_auto_creation

    @strawberry.field(description="null = unlimited; beyond it new mailboxes stay PENDING_LIMIT")
    def mailbox_limit(self) -> int | None:
        return self.row.mailbox_limit

    @strawberry.field(description='Synced mail is tagged in the mailbox ("CRM" label in Gmail).')
    def label_synced_mail(self) -> bool:
        return self.row.label_synced_mail


@strawberry.type
class Workspace(Node):
    row: strawberry.Private[tables.Workspace]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Workspace", self.row.id)

    @strawberry.field
    def name(self) -> str:
        return self.row.name

    @strawberry.field
    def settings(self) -> WorkspaceSettings:
        return WorkspaceSettings(row=self.row)

    @strawberry.field(description="BCC/forward address that files mail into this workspace")
    def capture_address(self, info: Info) -> str:
        return capture_address(self.row, info.context.runtime.settings.capture_domain)


@strawberry.type
class Viewer:
    user: User
    workspace: Workspace
