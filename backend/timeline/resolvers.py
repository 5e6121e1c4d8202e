import dataclasses

import strawberry

from backend.contacts import loaders as contact_loaders
from backend.contacts.resolvers import DeletePayload
from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_viewer, user_errors
from backend.graphql.inputs import optional_id, required_id
from backend.graphql.relay import connection, id_of, page_request
from backend.kit.errors import ServiceError
from backend.kit.pagination import PageRequest, count
from backend.kit.text import clean_search
from backend.mail import tables
from backend.timeline import loaders as timeline_loaders
from backend.timeline import queries, service
from backend.timeline.types import Email, EmailConnection, EmailFilter, Thread, ThreadConnection


@strawberry.input
class FileEmailInput:
    email_id: strawberry.ID
    contact_id: strawberry.ID


@strawberry.input
class MoveEmailInput:
    email_id: strawberry.ID
    from_contact_id: strawberry.ID
    to_contact_id: strawberry.ID


@strawberry.type
class EmailPayload:
    email: Email | None
    user_errors: list[UserError]


def email_payload(result: tables.Email | ServiceError) -> EmailPayload:
    if isinstance(result, ServiceError):
        return EmailPayload(email=None, user_errors=user_errors(result, ["input"]))
    return EmailPayload(email=Email(row=result), user_errors=[])


def _email_query(filter: EmailFilter | None, *, unassigned: bool = False) -> queries.EmailQuery:
    if filter is None:
        return queries.EmailQuery(unassigned=unassigned)
    return queries.EmailQuery(
        contact_id=optional_id(filter.contact_id, "Contact", ["filter", "contactId"]),
        mailbox_id=optional_id(filter.mailbox_id, "Mailbox", ["filter", "mailboxId"]),
        user_id=optional_id(filter.user_id, "User", ["filter", "userId"]),
        direction=filter.direction,
        source=filter.source,
        search=clean_search(filter.search, ["filter", "search"]),
        since=filter.since,
        until=filter.until,
        unassigned=unassigned,
    )


async def _emails(
    info: Info, first: int | None, after: str | None, query: queries.EmailQuery
) -> EmailConnection:
    viewer = require_viewer(info)
    session = info.context.session
    request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
    query = dataclasses.replace(query, viewer_id=viewer.user.id)
    page, stmt = await queries.emails_page(session, viewer.workspace_id, query, request)
    return connection(
        EmailConnection, [Email(row=e) for e in page.items], page, lambda: count(session, stmt)
    )


@strawberry.type
class MailQuery:
    @strawberry.field(description="The workspace's filed mail, newest first.")
    async def emails(
        self,
        info: Info,
        first: int | None = 20,
        after: str | None = None,
        filter: EmailFilter | None = None,
    ) -> EmailConnection:
        require_viewer(info)
        # Text no column can hold is the client's error, not "matches nothing".
        clean_search(filter.search if filter else None, ["filter", "search"])
        try:
            query = _email_query(filter)
        except ServiceError:
            # A filter naming an unknown object matches nothing, like any other id.
            query = queries.EmailQuery(match_nothing=True)
        return await _emails(info, first, after, query)

    @strawberry.field
    async def email(self, info: Info, id: strawberry.ID) -> Email | None:
        require_viewer(info)
        row_id = id_of(id, "Email")
        row = await timeline_loaders.email(info).load(row_id) if row_id else None
        return Email(row=row) if row else None

    @strawberry.field(
        description="Threads, latest activity first; narrowed to a contact's when given."
    )
    async def threads(
        self,
        info: Info,
        first: int | None = 20,
        after: str | None = None,
        contact_id: strawberry.ID | None = None,
    ) -> ThreadConnection:
        viewer = require_viewer(info)
        session = info.context.session
        request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
        contact = id_of(contact_id, "Contact")
        if contact_id is not None and (
            contact is None or await contact_loaders.contact(info).load(contact) is None
        ):
            request = PageRequest(0, None)
        page, stmt = await queries.threads_page(session, viewer.workspace_id, contact, request)
        return connection(
            ThreadConnection,
            [Thread(row=t) for t in page.items],
            page,
            lambda: count(session, stmt),
        )

    @strawberry.field
    async def thread(self, info: Info, id: strawberry.ID) -> Thread | None:
        require_viewer(info)
        row_id = id_of(id, "Thread")
        row = await timeline_loaders.thread(info).load(row_id) if row_id else None
        return Thread(row=row) if row else None

    @strawberry.field(description="captured mail that matched no contact")
    async def unassigned_emails(
        self, info: Info, first: int | None = 20, after: str | None = None
    ) -> EmailConnection:
        return await _emails(info, first, after, queries.EmailQuery(unassigned=True))


@strawberry.type
class MailMutation:
    @strawberry.mutation(
        description="add to a contact's timeline; also assigns an unassigned email"
    )
    async def file_email(self, info: Info, input: FileEmailInput) -> EmailPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        result = await attempt(
            info,
            lambda: service.file_email(
                scope.session,
                viewer,
                scope.effects,
                required_id(input.email_id, "Email", ["emailId"]),
                required_id(input.contact_id, "Contact", ["contactId"]),
            ),
        )
        return email_payload(result)

    @strawberry.mutation
    async def move_email(self, info: Info, input: MoveEmailInput) -> EmailPayload:
        viewer = require_viewer(info)
        scope = info.context.scope
        result = await attempt(
            info,
            lambda: service.move_email(
                scope.session,
                viewer,
                scope.effects,
                required_id(input.email_id, "Email", ["emailId"]),
                required_id(input.from_contact_id, "Contact", ["fromContactId"]),
                required_id(input.to_contact_id, "Contact", ["toContactId"]),
            ),
        )
        return email_payload(result)

    @strawberry.mutation(description="removes it from the CRM only, never from the mailbox")
    async def delete_email(self, info: Info, id: strawberry.ID) -> DeletePayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info, lambda: service.delete_email(session, viewer, required_id(id, "Email", ["id"]))
        )
        if isinstance(result, ServiceError):
            return DeletePayload(deleted_id=None, user_errors=user_errors(result))
        return DeletePayload(deleted_id=id, user_errors=[])
