import datetime
from typing import TYPE_CHECKING, Annotated

import strawberry

from backend.contacts import tables
from backend.graphql.context import Info
from backend.graphql.relay import Connection, Node, connection, page_request, to_global_id
from backend.kit.pagination import count
from backend.mail import queries as mail_queries
from backend.workspaces.types import User

if TYPE_CHECKING:
    from backend.mail.types import EmailConnection, ThreadConnection


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
        addresses = await info.context.loaders.contact_addresses.load(self.row.id)
        return addresses[0] if addresses else None

    @strawberry.field
    async def additional_emails(self, info: Info) -> list[str]:
        return (await info.context.loaders.contact_addresses.load(self.row.id))[1:]

    @strawberry.field
    async def owner(self, info: Info) -> User | None:
        if self.row.owner_id is None:
            return None
        user = await info.context.loaders.user.load(self.row.owner_id)
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
    ) -> Annotated["EmailConnection", strawberry.lazy("backend.mail.types")]:
        from backend.mail.types import Email, EmailConnection

        session = info.context.session
        request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
        page, stmt = await mail_queries.timeline_page(session, self.row.id, request)
        return connection(
            EmailConnection, [Email(row=e) for e in page.items], page, lambda: count(session, stmt)
        )

    @strawberry.field(description="Threads with mail on this contact's timeline, latest first.")
    async def threads(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> Annotated["ThreadConnection", strawberry.lazy("backend.mail.types")]:
        from backend.mail.types import Thread, ThreadConnection

        session = info.context.session
        request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
        page, stmt = await mail_queries.threads_page(
            session, self.row.workspace_id, self.row.id, request
        )
        return connection(
            ThreadConnection,
            [Thread(row=t) for t in page.items],
            page,
            lambda: count(session, stmt),
        )


@strawberry.type
class ContactConnection(Connection[Contact]):
    pass
