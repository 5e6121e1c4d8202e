from collections.abc import Awaitable, Callable
from typing import TypeVar

import strawberry

from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_viewer, user_errors
from backend.graphql.inputs import required_id
from backend.graphql.relay import id_of
from backend.kit.errors import ServiceError
from backend.mailboxes import access, connect, service, tables
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes.types import EmailVisibility, Mailbox, Provider, SyncMode

T = TypeVar("T")


@strawberry.input
class ConnectMailboxInput:
    provider: Provider
    login_hint: str | None = None
    sync_mode: SyncMode | None = SyncMode.TWO_WAY


@strawberry.type
class ConnectMailboxPayload:
    authorization_url: str | None
    user_errors: list[UserError]


@strawberry.input
class ConnectImapMailboxInput:
    email_address: str
    username: str | None = None
    password: str
    imap_host: str
    imap_port: int | None = 993
    smtp_host: str
    smtp_port: int | None = 465
    security: str | None = strawberry.field(
        default="TLS", description="TLS | STARTTLS | NONE (NONE allowed only for loopback hosts)"
    )
    sync_mode: SyncMode | None = SyncMode.TWO_WAY
    identities: list[str] | None = strawberry.field(
        default=None,
        description="the other addresses this mailbox sends and receives as (aliases); "
        "null keeps those a reconnected mailbox has",
    )


@strawberry.input
class UpdateMailboxInput:
    id: strawberry.ID
    sync_mode: SyncMode | None = None
    visibility: EmailVisibility | None = None


@strawberry.input
class DisconnectMailboxInput:
    id: strawberry.ID
    erase_history: bool | None = False


@strawberry.type
class MailboxPayload:
    mailbox: Mailbox | None
    user_errors: list[UserError]


def mailbox_payload(
    result: tables.Mailbox | ServiceError, prefix: list[str] | None
) -> MailboxPayload:
    if isinstance(result, ServiceError):
        return MailboxPayload(mailbox=None, user_errors=user_errors(result, prefix))
    return MailboxPayload(mailbox=Mailbox(row=result), user_errors=[])


def imap_input(given: ConnectImapMailboxInput) -> connect.ImapInput:
    return connect.ImapInput(
        email_address=given.email_address,
        username=given.username,
        password=given.password,
        imap_host=given.imap_host,
        imap_port=given.imap_port if given.imap_port is not None else 993,
        smtp_host=given.smtp_host,
        smtp_port=given.smtp_port if given.smtp_port is not None else 465,
        security=given.security or "TLS",
        sync_mode=tables.SyncMode((given.sync_mode or SyncMode.TWO_WAY).value),
        identities=given.identities,
    )


async def outside_transaction(action: Callable[[], Awaitable[T]]) -> T | ServiceError:
    """A step that must not run inside the operation's transaction (the IMAP and SMTP
    logins: SQLite's write lock would be held meanwhile), its ServiceError as the answer."""
    try:
        return await action()
    except ServiceError as exc:
        return exc


def authorization_payload(
    result: str | ServiceError | None, prefix: list[str] | None
) -> ConnectMailboxPayload:
    if isinstance(result, ServiceError):
        return ConnectMailboxPayload(
            authorization_url=None, user_errors=user_errors(result, prefix)
        )
    return ConnectMailboxPayload(authorization_url=result, user_errors=[])


@strawberry.type
class MailboxQuery:
    @strawberry.field(description="the viewer's; OWNER/ADMIN: the workspace's")
    async def mailboxes(self, info: Info) -> list[Mailbox]:
        viewer = require_viewer(info)
        return [
            Mailbox(row=m) for m in await service.visible_mailboxes(info.context.session, viewer)
        ]

    @strawberry.field
    async def mailbox(self, info: Info, id: strawberry.ID) -> Mailbox | None:
        viewer = require_viewer(info)
        row_id = id_of(id, "Mailbox")
        row = await mailbox_loaders.mailbox(info).load(row_id) if row_id else None
        return Mailbox(row=row) if row and access.can_manage(viewer, row) else None


@strawberry.type
class MailboxMutation:
    @strawberry.mutation(description="OAuth providers; finish at the callback URL")
    async def connect_mailbox(
        self, info: Info, input: ConnectMailboxInput
    ) -> ConnectMailboxPayload:
        viewer = require_viewer(info)
        settings = info.context.runtime.settings

        async def begin() -> str:
            return connect.begin(
                settings,
                viewer,
                Provider(input.provider.value),
                login_hint=input.login_hint,
                sync_mode=tables.SyncMode((input.sync_mode or SyncMode.TWO_WAY).value),
            )

        return authorization_payload(await attempt(info, begin), ["input"])

    @strawberry.mutation(
        description="same account or a new address, keeping history; an IMAP mailbox takes "
        "its new settings in `imap` (logged in to before they are stored) and answers no URL"
    )
    async def reconnect_mailbox(
        self, info: Info, id: strawberry.ID, imap: ConnectImapMailboxInput | None = None
    ) -> ConnectMailboxPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        settings = info.context.runtime.settings

        async def reconnect() -> str | None:
            mailbox_id = required_id(id, "Mailbox", ["id"])
            return await connect.begin_reconnect(scope.session, settings, viewer, mailbox_id)

        if imap is None:
            return authorization_payload(await attempt(info, reconnect), None)

        given = imap_input(imap)

        async def check_then_probe() -> connect.ProbedImap:
            mailbox_id = required_id(id, "Mailbox", ["id"])
            # Access first, in a session that takes no write lock, so a stranger's id is
            # refused without logging in anywhere.
            async with info.context.runtime.unit_of_work(read_only=True) as work:
                await connect.imap_mailbox(work.session, viewer, mailbox_id)
            return await connect.probe_imap_input(settings, given)

        probed = await outside_transaction(check_then_probe)
        if isinstance(probed, ServiceError):
            return authorization_payload(probed, None)

        async def store() -> None:
            # Checked again: the mailbox may have changed hands during the logins.
            mailbox_id = required_id(id, "Mailbox", ["id"])
            mailbox = await connect.imap_mailbox(scope.session, viewer, mailbox_id)
            await connect.store_imap(
                scope.session, scope.effects, settings, viewer, probed, mailbox=mailbox
            )

        return authorization_payload(await attempt(info, store), None)

    @strawberry.mutation(
        description="logs in to IMAP and SMTP before storing anything; an address already "
        "connected (or disconnected) by the viewer gets the new settings and keeps its history"
    )
    async def connect_imap_mailbox(
        self, info: Info, input: ConnectImapMailboxInput
    ) -> MailboxPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        settings = info.context.runtime.settings
        given = imap_input(input)
        probed = await outside_transaction(lambda: connect.probe_imap_input(settings, given))
        if isinstance(probed, ServiceError):
            return mailbox_payload(probed, ["input"])
        result = await attempt(
            info,
            lambda: connect.store_imap(scope.session, scope.effects, settings, viewer, probed),
        )
        return mailbox_payload(result, ["input"])

    @strawberry.mutation
    async def update_mailbox(self, info: Info, input: UpdateMailboxInput) -> MailboxPayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.update_mailbox(
                session,
                viewer,
                required_id(input.id, "Mailbox", ["id"]),
                sync_mode=input.sync_mode,
                visibility=input.visibility,
            ),
        )
        return mailbox_payload(result, ["input"])

    @strawberry.mutation
    async def disconnect_mailbox(self, info: Info, input: DisconnectMailboxInput) -> MailboxPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        result = await attempt(
            info,
            lambda: service.disconnect_mailbox(
                scope.session,
                viewer,
                scope.effects,
                required_id(input.id, "Mailbox", ["id"]),
                erase=bool(input.erase_history),
            ),
        )
        return mailbox_payload(result, ["input"])

    @strawberry.mutation(description="run a pass now")
    async def sync_mailbox(self, info: Info, id: strawberry.ID) -> MailboxPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        result = await attempt(
            info,
            lambda: service.request_sync(
                scope.session, viewer, scope.effects, required_id(id, "Mailbox", ["id"])
            ),
        )
        return mailbox_payload(result, None)
