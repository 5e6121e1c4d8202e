from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.service import Viewer
from backend.auth.tables import ContactMatching, User, Workspace
from backend.contacts import queries
from backend.contacts.tables import Contact, ContactAddress
from backend.kit.addresses import validate_address
from backend.kit.errors import ErrorCode, NotFound, ServiceError
from backend.kit.text import clean_name
from backend.mail import service as mail_service

UNSET = object()
MAX_ADDRESSES = 50


def _addresses(main: str, additional: Sequence[str]) -> list[str]:
    addresses = [validate_address(main, ["email"])]
    if len(additional) >= MAX_ADDRESSES:
        raise ServiceError(
            ErrorCode.TOO_MANY_ADDRESSES,
            f"A contact can have at most {MAX_ADDRESSES} addresses.",
            ["additionalEmails"],
        )
    for i, extra in enumerate(additional):
        address = validate_address(extra, ["additionalEmails", str(i)])
        if address in addresses:
            raise ServiceError(
                ErrorCode.DUPLICATE_EMAIL,
                f"{address} is listed twice on this contact.",
                ["additionalEmails", str(i)],
            )
        addresses.append(address)
    return addresses


async def _check_owner(session: AsyncSession, viewer: Viewer, owner_id: uuid.UUID | None) -> None:
    if owner_id is None:
        return
    owner = await session.get(User, owner_id)
    if owner is None or owner.workspace_id != viewer.workspace_id:
        raise NotFound("User", ["ownerId"])


async def _replace_addresses(session: AsyncSession, contact: Contact, addresses: list[str]) -> None:
    await session.execute(
        delete(ContactAddress).where(col(ContactAddress.contact_id) == contact.id)
    )
    session.add_all(
        ContactAddress(
            workspace_id=contact.workspace_id, contact_id=contact.id, address=a, position=i
        )
        for i, a in enumerate(addresses)
    )


async def get_contact(
    session: AsyncSession, viewer: Viewer, contact_id: uuid.UUID | None
) -> Contact:
    contact = await session.get(Contact, contact_id) if contact_id else None
    if contact is None or contact.workspace_id != viewer.workspace_id:
        raise NotFound("Contact", ["id"])
    return contact


async def create_contact(
    session: AsyncSession,
    viewer: Viewer,
    *,
    email: str,
    name: str | None = None,
    additional_emails: Sequence[str] = (),
    owner_id: uuid.UUID | None = None,
) -> Contact:
    """A new contact; mail filed from now on can land on its timeline (R2)."""
    addresses = _addresses(email, additional_emails)
    await _check_owner(session, viewer, owner_id)
    contact = Contact(
        workspace_id=viewer.workspace_id,
        name=clean_name(name, ["name"]),
        owner_id=owner_id,
    )
    session.add(contact)
    await session.flush()
    await _replace_addresses(session, contact, addresses)
    await session.flush()
    return contact


async def update_contact(
    session: AsyncSession,
    viewer: Viewer,
    contact_id: uuid.UUID | None,
    *,
    name: object = UNSET,
    email: str | None = None,
    additional_emails: Sequence[str] | None = None,
    owner_id: object = UNSET,
) -> Contact:
    contact = await get_contact(session, viewer, contact_id)
    if email is not None or additional_emails is not None:
        current = (
            await session.scalars(
                select(ContactAddress.address)
                .where(ContactAddress.contact_id == contact.id)
                .order_by(col(ContactAddress.position))
            )
        ).all()
        main = email if email is not None else current[0]
        extra = additional_emails if additional_emails is not None else current[1:]
        await _replace_addresses(session, contact, _addresses(main, extra))
    if name is not UNSET:
        contact.name = clean_name(name if isinstance(name, str) else None, ["name"])
    if owner_id is not UNSET:
        await _check_owner(session, viewer, owner_id if isinstance(owner_id, uuid.UUID) else None)
        contact.owner_id = owner_id if isinstance(owner_id, uuid.UUID) else None
    session.add(contact)
    await session.flush()
    return contact


async def delete_contact(
    session: AsyncSession, viewer: Viewer, contact_id: uuid.UUID | None
) -> uuid.UUID:
    contact = await get_contact(session, viewer, contact_id)
    filed = await mail_service.email_ids_on_timeline(session, contact.id)
    await session.delete(contact)
    await session.flush()
    # R5: mail is only kept while it is on some contact's timeline.
    await mail_service.delete_unfiled(session, filed)
    return contact.id


async def set_email_sync(
    session: AsyncSession, viewer: Viewer, contact_id: uuid.UUID | None, enabled: bool
) -> Contact:
    """R4: a contact with sync off has all its addresses excluded from now on."""
    contact = await get_contact(session, viewer, contact_id)
    contact.email_sync_enabled = enabled
    session.add(contact)
    await session.flush()
    return contact


class Person(Protocol):
    """An address of a message, with the display name it came with."""

    @property
    def address(self) -> str: ...

    @property
    def name(self) -> str | None: ...


async def create_auto_contacts(
    session: AsyncSession, workspace_id: uuid.UUID, people: Sequence[Person]
) -> list[Contact]:
    """R5 auto-creation, one contact per address: rare enough to go through the ORM."""
    created = []
    for person in people:
        contact = Contact(workspace_id=workspace_id, name=person.name)
        session.add(contact)
        await session.flush()
        session.add(
            ContactAddress(workspace_id=workspace_id, contact_id=contact.id, address=person.address)
        )
        created.append(contact)
    await session.flush()
    return created


async def contacts_to_file_on(
    session: AsyncSession,
    workspace: Workspace,
    candidates: Sequence[str],
    creatable: Sequence[Person],
) -> list[Contact]:
    """The contacts one message is filed on (R2): those its candidate addresses match, plus a
    new contact for each creatable address no contact has at all (R5 decides per address)."""
    matched = await queries.contacts_for_addresses(
        session,
        workspace.id,
        list(candidates),
        primary_only=workspace.contact_matching == ContactMatching.PRIMARY_EMAIL_ONLY,
    )
    taken = await queries.known_addresses(session, workspace.id, [p.address for p in creatable])
    fresh = [p for p in creatable if p.address not in matched and p.address not in taken]
    found = [matched[a] for a in candidates if a in matched]
    found += await create_auto_contacts(session, workspace.id, fresh)
    return list({c.id: c for c in found}.values())
