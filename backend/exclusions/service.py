from __future__ import annotations

import uuid

import sqlalchemy as sa
from publicsuffixlist import PublicSuffixList
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.service import Viewer
from backend.contacts.tables import Contact, ContactAddress
from backend.exclusions import access
from backend.exclusions.rules import is_excluded
from backend.exclusions.tables import Exclusion, ExclusionKind
from backend.kit.addresses import validate_address, validate_domain
from backend.kit.errors import ErrorCode, NotFound, ServiceError
from backend.mail import service as mail_service
from backend.mail.tables import Email, EmailSource, Participant, ParticipantRole, TimelineEntry

_PUBLIC_SUFFIXES = PublicSuffixList()  # the list bundled with the package, IDNA aware


def parse_value(value: str) -> tuple[str, ExclusionKind]:
    if "@" in value.strip().lstrip("@"):
        return validate_address(value, ["value"]), ExclusionKind.ADDRESS
    domain = validate_domain(value, ["value"])
    # R4: a public suffix would exclude every registrant under it (every .com sender).
    if _PUBLIC_SUFFIXES.is_public(domain):
        raise ServiceError(
            ErrorCode.PUBLIC_SUFFIX,
            f"{domain} is a public suffix: exclude a domain under it instead.",
            ["value"],
        )
    return domain, ExclusionKind.DOMAIN


async def add_exclusion(
    session: AsyncSession, viewer: Viewer, value: str, *, purge_existing: bool = False
) -> Exclusion:
    """Anyone can add (R4). It applies from now on; `purge_existing` also unfiles past mail."""
    normalized, kind = parse_value(value)
    duplicate = await session.scalar(
        select(Exclusion.id).where(
            Exclusion.workspace_id == viewer.workspace_id, Exclusion.value == normalized
        )
    )
    if duplicate is not None:
        raise ServiceError(
            ErrorCode.ALREADY_EXCLUDED, f"{normalized} is already excluded.", ["value"]
        )
    exclusion = Exclusion(
        workspace_id=viewer.workspace_id, value=normalized, kind=kind, created_by_id=viewer.user.id
    )
    session.add(exclusion)
    await session.flush()
    if purge_existing:
        await purge_excluded(session, viewer.workspace_id, normalized)
    return exclusion


async def remove_exclusion(
    session: AsyncSession, viewer: Viewer, exclusion_id: uuid.UUID | None
) -> uuid.UUID:
    """Owners and admins remove any exclusion; a USER only their own (others look missing)."""
    exclusion = await session.get(Exclusion, exclusion_id) if exclusion_id else None
    if exclusion is None or not access.can_see(viewer, exclusion):
        raise NotFound("Exclusion", ["id"])
    await session.delete(exclusion)
    await session.flush()
    return exclusion.id


async def purge_excluded(session: AsyncSession, workspace_id: uuid.UUID, value: str) -> int:
    """Unfile what R4 would now skip because of `value`: returns how many timeline entries went."""
    covered = {value}
    pattern = f"%@{value}" if "@" not in value else value
    matches = (
        col(Participant.address).like(pattern)
        if "@" not in value
        else col(Participant.address) == value
    )
    subdomains = col(Participant.address).like(f"%.{value}") if "@" not in value else sa.false()
    touched = (
        await session.execute(
            select(Participant.email_id, Participant.role, Participant.address)
            .join(Email, col(Email.id) == Participant.email_id)
            .where(
                Email.workspace_id == workspace_id,
                Email.source != EmailSource.CRM,  # R4: CRM-sent mail stays filed.
                sa.or_(matches, subdomains),
            )
        )
    ).all()
    if not touched:
        return 0
    removed = 0
    email_ids = {row[0] for row in touched}
    blocking = {
        row[0]
        for row in touched
        if row[1] in (ParticipantRole.FROM, ParticipantRole.TO) and is_excluded(row[2], covered)
    }
    if blocking:
        result = await session.execute(
            delete(TimelineEntry).where(col(TimelineEntry.email_id).in_(blocking))
        )
        removed += result.rowcount  # type: ignore[attr-defined]
    cc_only = email_ids - blocking
    if cc_only:
        # Contacts whose filing came from an excluded Cc address lose the email.
        excluded_contacts = select(ContactAddress.contact_id).where(
            ContactAddress.workspace_id == workspace_id,
            sa.or_(
                col(ContactAddress.address) == value,
                col(ContactAddress.address).like(f"%@{value}"),
                col(ContactAddress.address).like(f"%.{value}"),
            )
            if "@" not in value
            else ContactAddress.address == value,
        )
        result = await session.execute(
            delete(TimelineEntry).where(
                col(TimelineEntry.email_id).in_(cc_only),
                col(TimelineEntry.contact_id).in_(excluded_contacts),
            )
        )
        removed += result.rowcount  # type: ignore[attr-defined]
    await session.flush()
    await mail_service.delete_unfiled(session, list(email_ids))
    await session.execute(
        sa.update(Contact)
        .where(col(Contact.workspace_id) == workspace_id)
        .values(
            last_email_at=select(sa.func.max(TimelineEntry.sent_at))
            .where(TimelineEntry.contact_id == Contact.id)
            .scalar_subquery()
        )
    )
    return removed


async def visible_exclusion(
    session: AsyncSession, viewer: Viewer, exclusion_id: uuid.UUID
) -> Exclusion | None:
    exclusion = await session.get(Exclusion, exclusion_id)
    if exclusion is None or not access.can_see(viewer, exclusion):
        return None
    return exclusion
