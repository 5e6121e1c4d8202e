from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from backend.contacts.tables import Contact, ContactAddress
from backend.kit.pagination import Page, PageRequest, count, keyset_page
from backend.kit.text import LIKE_ESCAPE, contains_pattern


async def contacts_by_ids(
    session: AsyncSession, workspace_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Contact]:
    rows = await session.scalars(
        select(Contact).where(col(Contact.id).in_(ids), Contact.workspace_id == workspace_id)
    )
    return {c.id: c for c in rows}


async def addresses_by_contact(
    session: AsyncSession, contact_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[str]]:
    rows = await session.execute(
        select(ContactAddress.contact_id, ContactAddress.address)
        .where(col(ContactAddress.contact_id).in_(contact_ids))
        .order_by(col(ContactAddress.contact_id), col(ContactAddress.position))
    )
    grouped: dict[uuid.UUID, list[str]] = defaultdict(list)
    for contact_id, address in rows:
        grouped[contact_id].append(address)
    return grouped


def _search_filter(search: str) -> sa.ColumnElement[bool]:
    """`search` (trimmed, lower-cased: `kit.text.clean_search`) anywhere in the name or an
    address, `%` and `_` included literally."""
    pattern = contains_pattern(search)
    by_address = (
        select(ContactAddress.contact_id)
        .where(col(ContactAddress.address).like(pattern, escape=LIKE_ESCAPE))
        .scalar_subquery()
    )
    return sa.or_(
        sa.func.lower(Contact.name).like(pattern, escape=LIKE_ESCAPE),
        col(Contact.id).in_(by_address),
    )


async def contacts_page(
    session: AsyncSession, workspace_id: uuid.UUID, request: PageRequest, search: str | None
) -> tuple[Page[Contact], SelectOfScalar[Contact]]:
    stmt = select(Contact).where(Contact.workspace_id == workspace_id)
    if search:
        stmt = stmt.where(_search_filter(search))
    page = await keyset_page(
        session,
        stmt,
        [col(Contact.created_at), col(Contact.id)],
        lambda c: (c.created_at, c.id),
        request,
        descending=True,
    )
    return page, stmt


async def count_contacts(session: AsyncSession, stmt: SelectOfScalar[Contact]) -> int:
    return await count(session, stmt)


async def contacts_for_addresses(
    session: AsyncSession,
    workspace_id: uuid.UUID,
    addresses: Sequence[str],
    *,
    primary_only: bool,
) -> dict[str, Contact]:
    """R2: each address to the earliest-created contact that has it."""
    if not addresses:
        return {}
    stmt = (
        select(ContactAddress.address, Contact)
        .join(Contact, col(Contact.id) == ContactAddress.contact_id)
        .where(
            ContactAddress.workspace_id == workspace_id, col(ContactAddress.address).in_(addresses)
        )
        .order_by(col(Contact.created_at), col(Contact.id))
    )
    if primary_only:
        stmt = stmt.where(ContactAddress.position == 0)
    found: dict[str, Contact] = {}
    for address, contact in await session.execute(stmt):
        found.setdefault(address, contact)
    return found


async def known_addresses(
    session: AsyncSession, workspace_id: uuid.UUID, addresses: Sequence[str]
) -> set[str]:
    """The addresses that some contact of the workspace has, main or additional."""
    if not addresses:
        return set()
    rows = await session.scalars(
        select(ContactAddress.address).where(
            ContactAddress.workspace_id == workspace_id, col(ContactAddress.address).in_(addresses)
        )
    )
    return set(rows)
