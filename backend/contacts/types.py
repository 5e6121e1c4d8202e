import datetime
from typing import TYPE_CHECKING, Annotated

import strawberry

from backend.auth import loaders as auth_loaders
from backend.contacts import loaders as contact_loaders
from backend.contacts import tables
from backend.graphql.context import Info
from backend.graphql.relay import Connection, Node, to_global_id
from backend.workspaces.types import User

if TYPE_CHECKING:
    from backend.timeline.types import EmailConnection, ThreadConnection


@strawberry.type
class Contact(Node):
    row: strawberry.Private[tables.Contact]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Contact", self.row.id)

    @strawberry.field
    def name(self) -> str | None:
        return self.row.name

    @strawberry.field(description="The main address.")
    async def email(self, info: Info) -> str | None:
        addresses = await contact_loaders.contact_addresses(info).load(self.row.id)
        return addresses[0] if addresses else None

    @strawberry.field
    async def additional_emails(self, info: Info) -> list[str]:
        return (await contact_loaders.contact_addresses(info).load(self.row.id))[1:]

    @strawberry.field
    async def owner(self, info: Info) -> User | None:
        if self.row.owner_id is None:
            return None
        user = await auth_loaders.user(info).load(self.row.owner_id)
        return User(row=user) if user else None

    @strawberry.field(description="false = this contact's addresses are excluded")
    def email_sync_enabled(self) -> bool:
        return self.row.email_sync_enabled

    @strawberry.field
    def created_at(self) -> datetime.datetime:
        return self.row.created_at

    @strawberry.field
    def last_email_at(self) -> datetime.datetime | None:
        return self.row.last_email_at

    @strawberry.field(description="Emails filed on this contact, newest first.")
    async def timeline(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> Annotated["EmailConnection", strawberry.lazy("backend.timeline.types")]:
        from backend.timeline.types import contact_timeline

        return await contact_timeline(info, self.row, first, after)

    @strawberry.field(description="Threads with mail on this contact's timeline, latest first.")
    async def threads(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> Annotated["ThreadConnection", strawberry.lazy("backend.timeline.types")]:
        from backend.timeline.types import contact_threads

        return await contact_threads(info, self.row, first, after)


@strawberry.type
class ContactConnection(Connection[Contact]):
    pass
