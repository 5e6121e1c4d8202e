import datetime
import enum

import strawberry
from sqlmodel import select

from backend.auth import loaders as auth_loaders
from backend.graphql.context import Info
from backend.graphql.relay import Connection, Node, connection, page_request, to_global_id
from backend.kit.errors import in_range
from backend.kit.pagination import count
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes import queries, tables
from backend.providers import base as providers
from backend.workspaces.types import User

Provider = providers.Provider
strawberry.enum(Provider)
SyncMode = tables.SyncMode
strawberry.enum(SyncMode)
EmailVisibility = tables.EmailVisibility
strawberry.enum(EmailVisibility)
MailboxStatus = tables.MailboxStatus
strawberry.enum(MailboxStatus)
SyncErrorCode = providers.SyncErrorCode
strawberry.enum(SyncErrorCode)

# activity(days:) looks back at most this far (ten years).
MAX_ACTIVITY_DAYS = 3650
FAILING = {tables.MailboxStatus.ERROR, tables.MailboxStatus.SUSPENDED}


@strawberry.type
class SyncError:
    row: strawberry.Private[tables.SyncErrorEntry]

    @strawberry.field
    def code(self) -> SyncErrorCode:
        return self.row.code

    @strawberry.field(description="what happened, in words a user understands")
    def message(self) -> str:
        return self.row.message

    @strawberry.field(description="what to do about it")
    def recommendation(self) -> str:
        return self.row.recommendation

    @strawberry.field
    def occurred_at(self) -> datetime.datetime:
        return self.row.occurred_at


@strawberry.type
class SyncErrorConnection(Connection[SyncError]):
    pass


@strawberry.type(description="counts over the window asked for")
class SyncActivity:
    queued: int
    synced: int
    failed: int


@strawberry.type
class Mailbox(Node):
    row: strawberry.Private[tables.Mailbox]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Mailbox", self.row.id)

    @strawberry.field
    def provider(self) -> Provider:
        return self.row.provider

    @strawberry.field
    def email_address(self) -> str:
        return self.row.email_address

    @strawberry.field(
        description="Provider aliases (send-as, proxy addresses) that are also this mailbox's."
    )
    def aliases(self) -> list[str]:
        return list(self.row.aliases)

    @strawberry.field
    async def owner(self, info: Info) -> User:
        row = await auth_loaders.user(info).load(self.row.owner_id)
        if row is None:
            raise LookupError(f"owner of mailbox {self.row.id} is missing")
        return User(row=row)

    @strawberry.field
    def status(self) -> MailboxStatus:
        return self.row.status

    @strawberry.field
    def sync_mode(self) -> SyncMode:
        return self.row.sync_mode

    @strawberry.field(description="what other users see of this mailbox's mail; the owner sees all")
    def visibility(self) -> EmailVisibility:
        return self.row.visibility

    @strawberry.field(description='"since"')
    def connected_at(self) -> datetime.datetime:
        return self.row.connected_at

    @strawberry.field(description="last completed sync pass")
    def last_synced_at(self) -> datetime.datetime | None:
        return self.row.last_synced_at

    @strawberry.field(description="last time a pass filed an email")
    def last_email_synced_at(self) -> datetime.datetime | None:
        return self.row.last_email_synced_at

    @strawberry.field(
        description="The error behind ERROR or SUSPENDED; null while the mailbox is healthy."
    )
    async def last_error(self, info: Info) -> SyncError | None:
        if self.row.status not in FAILING:
            return None
        row = await mailbox_loaders.last_error(info).load(self.row.id)
        return SyncError(row=row) if row else None

    @strawberry.field(description="The error log, newest first.")
    async def errors(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> SyncErrorConnection:
        session = info.context.session
        request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
        page = await queries.errors_page(session, self.row.id, request)

        async def total() -> int:
            return await count(
                session,
                select(tables.SyncErrorEntry).where(
                    tables.SyncErrorEntry.mailbox_id == self.row.id
                ),
            )

        return connection(SyncErrorConnection, [SyncError(row=e) for e in page.items], page, total)

    @strawberry.field(description=f"Totals of the last `days` days (1 to {MAX_ACTIVITY_DAYS}).")
    async def activity(self, info: Info, days: int | None = 30) -> SyncActivity:
        days = in_range("days", 30 if days is None else days, 1, MAX_ACTIVITY_DAYS)
        queued, synced, failed = await queries.activity_totals(
            info.context.session, self.row.id, days
        )
        return SyncActivity(queued=queued, synced=synced, failed=failed)


@strawberry.enum
class ConnectionHealth(enum.Enum):
    OK = "OK"
    NOT_CONNECTED = "NOT_CONNECTED"
    ERROR = "ERROR"


@strawberry.type
class UserConnectionStatus:
    user: User
    health: ConnectionHealth
    mailboxes: list[Mailbox]


def health_of(mailboxes: list[tables.Mailbox]) -> ConnectionHealth:
    live = [m for m in mailboxes if m.status != tables.MailboxStatus.DISCONNECTED]
    if not live:
        return ConnectionHealth.NOT_CONNECTED
    if any(m.status in FAILING for m in live):
        return ConnectionHealth.ERROR
    return ConnectionHealth.OK
