import asyncio
import datetime
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import strawberry

from backend.auth import loaders as auth_loaders
from backend.contacts import loaders as contact_loaders
from backend.contacts.tables import Contact as ContactRow
from backend.contacts.types import Contact
from backend.graphql.context import Info
from backend.graphql.fields import from_row
from backend.graphql.loaders import then
from backend.graphql.relay import Connection, Node, connection, page_request, to_global_id
from backend.kit.html import without_remote_images
from backend.kit.pagination import count
from backend.mail import tables
from backend.mailboxes import access as mailbox_access
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes.tables import Mailbox as MailboxRow
from backend.timeline import loaders as timeline_loaders
from backend.timeline import queries
from backend.timeline.access import Access, access_for
from backend.workspaces.types import User

if TYPE_CHECKING:
    from backend.mailboxes.types import Mailbox

T = TypeVar("T")

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
    def contact(self, info: Info) -> Contact | None:
        def match(owners: dict[str, uuid.UUID]) -> Any:
            if self.email in owners:
                return None
            return then(
                contact_loaders.contact_for_address(info).load(self.email),
                lambda row: Contact(row=row) if row else None,
            )

        return then(mailbox_loaders.own_addresses.future(info), match)  # type: ignore[no-any-return]

    @strawberry.field(description="The CRM user this address belongs to.")
    def user(self, info: Info) -> User | None:
        def match(owners: dict[str, uuid.UUID]) -> Any:
            user_id = owners.get(self.email)
            if user_id is None:
                return None
            return then(
                auth_loaders.user(info).load(user_id), lambda row: User(row=row) if row else None
            )

        return then(mailbox_loaders.own_addresses.future(info), match)  # type: ignore[no-any-return]


@strawberry.type
class Attachment:
    filename: str
    content_type: str
    size: int = strawberry.field(description="bytes; content is not stored")


def _email_id(row_id: uuid.UUID) -> strawberry.ID:
    return to_global_id("Email", row_id)


def _thread_id(row_id: uuid.UUID) -> strawberry.ID:
    return to_global_id("Thread", row_id)


@strawberry.type
class Email(Node):
    row: strawberry.Private[tables.Email]
    id: strawberry.ID = from_row(convert=_email_id)  # type: ignore[assignment]

    def _gated(self, info: Info, needed: Access, value: Callable[[], T], otherwise: T) -> Any:
        """`value()` where the viewer's access (R17) is at least `needed`, else `otherwise`;
        at once when the mailbox is loaded (see `then`)."""
        if self.row.mailbox_id is None:
            return value()

        def gate(mailbox: MailboxRow | None) -> T:
            if mailbox is None:
                return value()
            access = access_for(info.context.viewer, mailbox.visibility, mailbox.owner_id)
            return value() if access >= needed else otherwise

        return then(mailbox_loaders.mailbox(info).load(self.row.mailbox_id), gate)

    def _participants(self, info: Info, role: tables.ParticipantRole) -> Any:
        return then(
            timeline_loaders.participants(info).load(self.row.id),
            lambda rows: [
                Participant(email=p.address, name=p.name) for p in rows if p.role == role
            ],
        )

    @strawberry.field
    def thread(self, info: Info) -> Annotated["Thread", strawberry.lazy("backend.timeline.types")]:
        def found(row: tables.Thread | None) -> Thread:
            if row is None:
                raise LookupError(f"thread {self.row.thread_id} of email {self.row.id} is missing")
            return Thread(row=row)

        return then(timeline_loaders.thread(info).load(self.row.thread_id), found)  # type: ignore[no-any-return]

    @strawberry.field(
        description="The mailbox that brought the email in; null unless you manage it "
        "(your own, or any for owners and admins)."
    )
    def mailbox(
        self, info: Info
    ) -> Annotated["Mailbox", strawberry.lazy("backend.mailboxes.types")] | None:
        from backend.mailboxes.types import Mailbox as MailboxType

        viewer = info.context.viewer
        if self.row.mailbox_id is None or viewer is None:
            return None
        # The mailbox's status, errors and activity are its managers' business: a colleague
        # sees the mail (as R17 allows) but not the mailbox, as with `mailbox(id)`.
        return then(  # type: ignore[no-any-return]
            mailbox_loaders.mailbox(info).load(self.row.mailbox_id),
            lambda row: (
                MailboxType(row=row) if row and mailbox_access.can_manage(viewer, row) else None
            ),
        )

    direction: EmailDirection = from_row()
    source: EmailSource = from_row()

    @strawberry.field(name="from")
    def from_(self, info: Info) -> Participant:
        return then(  # type: ignore[no-any-return]
            timeline_loaders.participants(info).load(self.row.id),
            lambda rows: next(
                (
                    Participant(email=p.address, name=p.name)
                    for p in rows
                    if p.role == tables.ParticipantRole.FROM
                ),
                Participant(email="", name=None),
            ),
        )

    @strawberry.field
    def to(self, info: Info) -> list[Participant]:
        return self._participants(info, tables.ParticipantRole.TO)  # type: ignore[no-any-return]

    @strawberry.field
    def cc(self, info: Info) -> list[Participant]:
        return self._participants(info, tables.ParticipantRole.CC)  # type: ignore[no-any-return]

    @strawberry.field
    def bcc(self, info: Info) -> list[Participant]:
        return self._participants(info, tables.ParticipantRole.BCC)  # type: ignore[no-any-return]

    @strawberry.field(description="null where the viewer may see metadata only")
    def subject(self, info: Info) -> str | None:
        return self._gated(info, Access.SUBJECT, lambda: self.row.subject, None)  # type: ignore[no-any-return]

    @strawberry.field
    def snippet(self, info: Info) -> str | None:
        return self._gated(info, Access.ALL, lambda: self.row.snippet, None)  # type: ignore[no-any-return]

    @strawberry.field
    def body_text(self, info: Info) -> str | None:
        return self._gated(info, Access.ALL, lambda: self.row.body_text, None)  # type: ignore[no-any-return]

    @strawberry.field(
        description="Sanitized: safe to render in a browser. Remote images are inert (their "
        "`src` removed, as mail clients do, so the sender's server never sees the view) "
        "unless `remoteImages` is true; cid: and data: images stay."
    )
    def body_html(
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
        html = self.row.body_html
        if html is None:
            return None
        return self._gated(  # type: ignore[no-any-return]
            info, Access.ALL, lambda: html if remote_images else without_remote_images(html), None
        )

    sent_at: datetime.datetime = from_row()

    @strawberry.field(description="the CRM user whose mailbox synced or sent it")
    def sent_by(self, info: Info) -> User | None:
        if self.row.sent_by_id is None:
            return None
        return then(  # type: ignore[no-any-return]
            auth_loaders.user(info).load(self.row.sent_by_id),
            lambda row: User(row=row) if row else None,
        )

    @strawberry.field
    def attachments(self, info: Info) -> list[Attachment]:
        def listed() -> list[Attachment]:
            return [
                Attachment(
                    filename=str(a.get("filename") or ""),
                    content_type=str(a.get("content_type") or "application/octet-stream"),
                    size=int(a.get("size") or 0),
                )
                for a in self.row.attachments
            ]

        none: list[Attachment] = []
        return self._gated(info, Access.ALL, listed, none)  # type: ignore[no-any-return]

    @strawberry.field(description="the timelines this email is filed on")
    def contacts(self, info: Info) -> list[Contact]:
        def filed(ids: list[uuid.UUID]) -> Any:
            return then(
                contact_loaders.contact(info).load_many(ids),
                lambda rows: [Contact(row=c) for c in rows if c is not None],
            )

        return then(timeline_loaders.email_contact_ids(info).load(self.row.id), filed)  # type: ignore[no-any-return]

    message_id: str = from_row(
        description="The RFC 5322 Message-ID: the same email in any mail system; replies name it."
    )
    delivery_status: DeliveryStatus | None = from_row()
    delivery_error: str | None = from_row()


@strawberry.type
class EmailConnection(Connection[Email]):
    pass


@strawberry.type
class Thread(Node):
    row: strawberry.Private[tables.Thread]
    id: strawberry.ID = from_row(convert=_thread_id)  # type: ignore[assignment]

    @strawberry.field(description="null where the viewer may see metadata only")
    def subject(self, info: Info) -> str | None:
        viewer = info.context.viewer
        return then(  # type: ignore[no-any-return]
            timeline_loaders.thread_subject_viewers(info).load(self.row.id),
            lambda viewers: (
                self.row.subject
                if any(access_for(viewer, v, owner) >= Access.SUBJECT for v, owner in viewers)
                else None
            ),
        )

    last_email_at: datetime.datetime = from_row()
    email_count: int = from_row()

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
    await prefetch_page(info, page.items)
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


def _selected(info: Info) -> set[str]:
    """Every field name selected anywhere under the current field (fragments included)."""
    names: set[str] = set()
    pending: list[Any] = list(info.selected_fields)
    while pending:
        selection = pending.pop()
        name = getattr(selection, "name", None)
        if name:
            names.add(name)
        pending.extend(getattr(selection, "selections", None) or ())
    return names


async def prefetch_page(info: Info, emails: Sequence[tables.Email]) -> None:
    """Fill the loaders a page's fields will read, with the statements those fields would
    run anyway (the same loaders, the same keys), so that the fields find their values ready
    and resolve without a coroutine each (`graphql.loaders.then`). Only what the operation
    selects is loaded."""
    if not emails:
        return
    names = _selected(info)
    ids = [e.id for e in emails]
    first: list[Awaitable[Any]] = []
    mailbox_ids = list({e.mailbox_id for e in emails if e.mailbox_id is not None})
    if mailbox_ids:
        # The R17 gates (subject, snippet, bodies, attachments) and `mailbox` read it.
        first.append(mailbox_loaders.mailbox(info).load_many(mailbox_ids))
    people = {"from", "to", "cc", "bcc"} & names
    if people:
        first.append(timeline_loaders.participants(info).load_many(ids))
    if "thread" in names:
        first.append(timeline_loaders.thread(info).load_many(list({e.thread_id for e in emails})))
    if "contacts" in names:
        first.append(timeline_loaders.email_contact_ids(info).load_many(ids))
    if people and ({"contact", "user"} & names):
        first.append(mailbox_loaders.own_addresses.future(info))
    await asyncio.gather(*first)
    second: list[Awaitable[Any]] = []
    # Senders and the participants' users in one batch, as the fields would ask for them.
    users = (
        {e.sent_by_id for e in emails if e.sent_by_id is not None} if "sentBy" in names else set()
    )
    if "contacts" in names:
        filed = await timeline_loaders.email_contact_ids(info).load_many(ids)
        second.append(
            contact_loaders.contact(info).load_many(list({c for cs in filed for c in cs}))
        )
    if people and ({"contact", "user"} & names):
        owners = await mailbox_loaders.own_addresses(info)
        rows = await timeline_loaders.participants(info).load_many(ids)
        addresses = {p.address for ps in rows for p in ps}
        if "contact" in names:
            strangers = sorted(a for a in addresses if a not in owners)
            second.append(contact_loaders.contact_for_address(info).load_many(strangers))
        if "user" in names:
            users.update(owners[a] for a in addresses if a in owners)
    if users:
        second.append(auth_loaders.user(info).load_many(list(users)))
    await asyncio.gather(*second)
