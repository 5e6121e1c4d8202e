import strawberry

from backend.contacts import loaders as contact_loaders
from backend.contacts import queries, service
from backend.contacts.types import Contact, ContactConnection
from backend.graphql.context import Info
from backend.graphql.errors import UserError, attempt, require_viewer, user_errors
from backend.graphql.inputs import optional_id, required_id
from backend.graphql.relay import connection, id_of, page_request
from backend.kit.errors import ServiceError
from backend.kit.text import clean_search


@strawberry.input
class CreateContactInput:
    name: str | None = None
    email: str
    additional_emails: list[str] | None = None
    owner_id: strawberry.ID | None = None


@strawberry.input
class UpdateContactInput:
    id: strawberry.ID
    name: str | None = strawberry.UNSET
    email: str | None = strawberry.UNSET
    additional_emails: list[str] | None = strawberry.UNSET
    owner_id: strawberry.ID | None = strawberry.UNSET


@strawberry.type
class ContactPayload:
    contact: Contact | None
    user_errors: list[UserError]


@strawberry.type
class DeletePayload:
    deleted_id: strawberry.ID | None
    user_errors: list[UserError]


def contact_payload(result: object, prefix: list[str] | None) -> ContactPayload:
    if isinstance(result, ServiceError):
        return ContactPayload(contact=None, user_errors=user_errors(result, prefix))
    assert not isinstance(result, BaseException)
    return ContactPayload(contact=Contact(row=result), user_errors=[])  # type: ignore[arg-type]


@strawberry.type
class ContactQuery:
    @strawberry.field
    async def contacts(
        self,
        info: Info,
        first: int | None = 20,
        after: str | None = None,
        search: str | None = None,
    ) -> ContactConnection:
        viewer = require_viewer(info)
        session = info.context.session
        request = page_request(first, after, 20, info.context.runtime.settings.max_page_size)
        term = clean_search(search, ["search"])
        page, stmt = await queries.contacts_page(session, viewer.workspace_id, request, term)
        return connection(
            ContactConnection,
            [Contact(row=c) for c in page.items],
            page,
            lambda: queries.count_contacts(session, stmt),
        )

    @strawberry.field
    async def contact(self, info: Info, id: strawberry.ID) -> Contact | None:
        require_viewer(info)
        row_id = id_of(id, "Contact")
        row = await contact_loaders.contact(info).load(row_id) if row_id else None
        return Contact(row=row) if row else None


@strawberry.type
class ContactMutation:
    @strawberry.mutation
    async def create_contact(self, info: Info, input: CreateContactInput) -> ContactPayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.create_contact(
                session,
                viewer,
                email=input.email,
                name=input.name,
                additional_emails=input.additional_emails or [],
                owner_id=optional_id(input.owner_id, "User", ["ownerId"]),
            ),
        )
        return contact_payload(result, ["input"])

    @strawberry.mutation
    async def update_contact(self, info: Info, input: UpdateContactInput) -> ContactPayload:
        viewer = require_viewer(info)
        session = info.context.session

        async def update() -> object:
            owner: object = service.UNSET
            if input.owner_id is not strawberry.UNSET:
                owner = optional_id(input.owner_id, "User", ["ownerId"])
            return await service.update_contact(
                session,
                viewer,
                required_id(input.id, "Contact", ["id"]),
                name=service.UNSET if input.name is strawberry.UNSET else input.name,
                email=None if input.email is strawberry.UNSET else (input.email or ""),
                additional_emails=None
                if input.additional_emails is strawberry.UNSET
                else (input.additional_emails or []),
                owner_id=owner,
            )

        return contact_payload(await attempt(info, update), ["input"])

    @strawberry.mutation
    async def delete_contact(self, info: Info, id: strawberry.ID) -> DeletePayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.delete_contact(session, viewer, required_id(id, "Contact", ["id"])),
        )
        if isinstance(result, ServiceError):
            return DeletePayload(deleted_id=None, user_errors=user_errors(result))
        return DeletePayload(deleted_id=id, user_errors=[])

    @strawberry.mutation
    async def set_contact_email_sync(
        self, info: Info, contact_id: strawberry.ID, enabled: bool
    ) -> ContactPayload:
        viewer = require_viewer(info)
        session = info.context.session
        result = await attempt(
            info,
            lambda: service.set_email_sync(
                session, viewer, required_id(contact_id, "Contact", ["contactId"]), enabled
            ),
        )
        return contact_payload(result, None)
