import datetime
import uuid
from typing import TYPE_CHECKING, Annotated

import strawberry

from backend.auth import loaders as auth_loaders
from backend.contacts import loaders as contact_loaders
from backend.contacts.tables import Contact as ContactRow
from backend.contacts.types import Contact
from backend.graphql.context import Info
from backend.graphql.relay import Connection, Node, connection, page_request, to_global_id
from backend.kit.html import without_remote_images
from backend.kit.pagination import count
from backend.mail import tables
from backend.mailboxes import access as mailbox_access
from backend.mailboxes import loaders as mailbox_loaders
from backend.timeline import loaders as timeline_loaders
from backend.timeline import queries
from backend.timeline.access import Access, access_for
from backend.workspaces.types import User

if TYPE_CHECKING:
    from backend.mailboxes.types import Mailbox

EmailDirection = tables.EmailDirection
strawberry.enum(EmailDirection)
EmailSource = tables.EmailSource
strawberry.enum(EmailSource)
DeliveryStatus = tables.DeliveryStatus
strawberry.enum(DeliveryStatus)


@strawberry.type
class Participant:
    email: str
    name: str | None

    @strawberry.field(description="The contact this address matches; never a user's address (R1).")
    async def contact(self, info: Info) -> Contact | None:
        if self.email in await mailbox_loaders.own_addresses(info):
            return None
        row = await contact_loaders.contact_for_address(info).load(self.email)
        return Contact(row=row) if row else None

    @strawberry.field(description="The CRM user this address belongs to.")
    async def user(self, info: Info) -> User | None:
        user_id = (await mailbox_loaders.own_addresses(info)).get(self.email)
        if user_id is None:
            return None
        row = await auth_loaders.user(info).load(user_id)
        return User(row=row) if row else None


@strawberry.type
class Attachment:
    filename: str
    content_type: str
    size: int = strawberry.field(description="bytes; content is not stored")


@strawberry.type
class Email(Node):
    row: strawberry.Private[tables.Email]

    async def _access(self, info: Info) -> Access:
        if self.row.mailbox_id is None:
            return Access.ALL
        mailbox = await mailbox_loaders.mailbox(info).load(self.row.mailbox_id)
        if mailbox is None:
            return Access.ALL
        return access_for(info.context.viewer, mailbox.visibility, mailbox.owner_id)

    async def _participants(self, info: Info, role: tables.ParticipantRole) -> list[Participant]:
        rows = await timeline_loaders.participants(info).load(self.row.id)
        return [Participant(email=p.address, name=p.name) for p in rows if p.role == role]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Email", self.row.id)

    @strawberry.field
    async def thread(
        self, info: Info
    ) -> Annotated["Thread", strawberry.lazy("backend.timeline.types")]:
        row = await timeline_loaders.thread(info).load(self.row.thread_id)
        if row is None:
            raise LookupError(f"thread {self.row.thread_id} of email {self.row.id} is missing")
        return Thread(row=row)

    @strawberry.field(
        description="The mailbox that brought the email in; null unless you manage it "
        "(your own, or any for owners and admins)."
    )
    async def mailbox(
        self, info: Info
    ) -> Annotated["Mailbox", strawberry.lazy("backend.mailboxes.types")] | None:
        from backend.mailboxes.types import Mailbox

        viewer = info.context.viewer
        if self.row.mailbox_id is None or viewer is None:
            return None
        row = await mailbox_loaders.mailbox(info).load(self.row.mailbox_id)
        # The mailbox's status, errors and activity are its managers' business: a colleague
        # sees the mail (as R17 allows) but not the mailbox, as with `mailbox(id)`.
        return Mailbox(row=row) if row and mailbox_access.can_manage(viewer, row) else None

    @strawberry.field
    def direction(self) -> EmailDirection:
        return self.row.direction

    @strawberry.field
    def source(self) -> EmailSource:
        return self.row.source

    @strawberry.field(name="from")
    async def from_(self, info: Info) -> Participant:
        senders = await self._participants(info, tables.ParticipantRole.FROM)
        return senders[0] if senders else Participant(email="", name=None)

    @strawberry.field
    async def to(self, info: Info) -> list[Participant]:
        return await self._participants(info, tables.ParticipantRole.TO)

    @strawberry.field
    async def cc(self, info: Info) -> list[Participant]:
        return await self._participants(info, tables.ParticipantRole.CC)

    @strawberry.field
    async def bcc(self, info: Info) -> list[Participant]:
        return await self._participants(info, tables.ParticipantRole.BCC)

    @strawberry.field(description="null where the viewer may see metadata only")
    async def subject(self, info: Info) -> str | None:
        return self.row.subject if await self._access(info) >= Access.SUBJECT else None

    @strawberry.field
    async def snippet(self, info: Info) -> str | None:
        return self.row.snippet if await self._access(info) == Access.ALL else None

    @strawberry.field
    async def body_text(self, info: Info) -> str | None:
        return self.row.body_text if await self._access(info) == Access.ALL else None

    @strawberry.field(
        description="Sanitized: safe to render in a browser. Remote images are inert (their "
        "`src` removed, as mail clients do, so the sender's server never sees the view) "
        "unless `remoteImages` is true; cid: and data: images stay."
    )
    async def body_html(
        self,
        info: Info,
        remote_images: Annotated[
            bool,
            strawberry.argument(
                description="true: keep the `src` of images on remote servers (they load, "
                "and their sender learns the email was opened)"
            ),
        ] = False,
    ) -> str | None:
        if await self._access(info) != Access.ALL or self.row.body_html is None:
            return None
        return self.row.body_html if remote_images else without_remote_images(self.row.body_html)

    @strawberry.field
    def sent_at(self) -> datetime.datetime:
        return self.row.sent_at

    @strawberry.field(description="the CRM user whose mailbox synced or sent it")
    async def sent_by(self, info: Info) -> User | None:
        if self.row.sent_by_id is None:
            return None
        row = await auth_loaders.user(info).load(self.row.sent_by_id)
        return User(row=row) if row else None

    @strawberry.field
    async def attachments(self, info: Info) -> list[Attachment]:
        if await self._access(info) != Access.ALL:
            return []
        return [
            Attachment(
                filename=str(a.get("filename") or ""),
                content_type=str(a.get("content_type") or "application/octet-stream"),
                size=int(a.get("size") or 0),
            )
            for a in self.row.attachments
        ]

    @strawberry.field(description="the timelines this email is filed on")
    async def contacts(self, info: Info) -> list[Contact]:
        ids = await timeline_loaders.email_contact_ids(info).load(self.row.id)
        return [Contact(row=c) for c in await contact_loaders.contacts(info, ids)]

    @strawberry.field(
        description="The RFC 5322 Message-ID: the same email in any mail system; replies name it."
    )
    def message_id(self) -> str:
        return self.row.message_id

    @strawberry.field
    def delivery_status(self) -> DeliveryStatus | None:
        return self.row.delivery_status

    @strawberry.field
    def delivery_error(self) -> str | None:
        return self.row.delivery_error


@strawberry.type
class EmailConnection(Connection[Email]):
    pass


@strawberry.type
class Thread(Node):
    row: strawberry.Private[tables.Thread]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Thread", self.row.id)

    @strawberry.field(description="null where the viewer may see metadata only")
    async def subject(self, info: Info) -> str | None:
        viewers = await timeline_loaders.thread_subject_viewers(info).load(self.row.id)
        if any(access_for(info.context.viewer, v, owner) >= Access.SUBJECT for v, owner in viewers):
            return self.row.subject
        return None

    @strawberry.field
    def last_email_at(self) -> datetime.datetime:
        return self.row.last_email_at

    @strawberry.field
    def email_count(self) -> int:
        return self.row.email_count

    @strawberry.field(description="Everyone in the thread's mail, each address once.")
    async def participants(self, info: Info) -> list[Participant]:
        email_ids = await timeline_loaders.thread_email_ids(info).load(self.row.id)
        seen: dict[str, Participant] = {}
        for rows in await timeline_loaders.participants(info).load_many(email_ids):
            for p in rows:
                if p.address not in seen or (seen[p.address].name is None and p.name):
                    seen[p.address] = Participant(email=p.address, name=p.name)
        return list(seen.values())

    @strawberry.field
    async def contacts(self, info: Info) -> list[Contact]:
        email_ids = await timeline_loaders.thread_email_ids(info).load(self.row.id)
        contact_ids: list[uuid.UUID] = []
        for ids in await timeline_loaders.email_contact_ids(info).load_many(email_ids):
            contact_ids.extend(i for i in ids if i not in contact_ids)
        return [Contact(row=c) for c in await contact_loaders.contacts(info, contact_ids)]

    @strawberry.field(description="Oldest first.")
    async def emails(
        self, info: Info, first: int | None = 50, after: str | None = None
    ) -> EmailConnection:
        session = info.context.session
        request = page_request(first, after, 50, info.context.runtime.settings.max_page_size)
        page, stmt = await queries.thread_emails_page(session, self.row.id, request)
        return connection(
            EmailConnection, [Email(row=e) for e in page.items], page, lambda: count(session, stmt)
        )


@strawberry.type
class ThreadConnection(Connection[Thread]):
    pass


@strawberry.input
class EmailFilter:
    contact_id: strawberry.ID | None = None
    mailbox_id: strawberry.ID | None = None
    user_id: strawberry.ID | None = strawberry.field(default=None, description="team member")
    direction: EmailDirection | None = None
    source: EmailSource | None = None
    search: str | None = strawberry.field(
        default=None, description="subject / participants / body text"
    )
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None


async def contact_timeline(
    info: Info, contact: ContactRow, first: int | None, after: str | None
) -> EmailConnection:
    """`Contact.timeline`: emails filed on the contact, newest first."""
    session = info.context.session
    request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
    page, _ = await queries.timeline_page(session, contact.id, request)
    return connection(
        EmailConnection,
        [Email(row=e) for e in page.items],
        page,
        lambda: timeline_loaders.timeline_count(info).load(contact.id),
    )


async def contact_threads(
    info: Info, contact: ContactRow, first: int | None, after: str | None
) -> ThreadConnection:
    """`Contact.threads`: threads with mail on the contact's timeline, latest first."""
    session = info.context.session
    request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
    page, stmt = await queries.threads_page(session, contact.workspace_id, contact.id, request)
    return connection(
        ThreadConnection, [Thread(row=t) for t in page.items], page, lambda: count(session, stmt)
    )
