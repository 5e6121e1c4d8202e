from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from backend.exclusions.tables import Exclusion
from backend.kit.pagination import Page, PageRequest, keyset_page


def visible_exclusions(
    workspace_id: uuid.UUID, user_id: uuid.UUID | None
) -> SelectOfScalar[Exclusion]:
    """R4: owners and admins see every exclusion (user_id None); a USER only their own."""
    stmt = select(Exclusion).where(Exclusion.workspace_id == workspace_id)
    if user_id is not None:
        stmt = stmt.where(Exclusion.created_by_id == user_id)
    return stmt


async def exclusions_page(
    session: AsyncSession, stmt: SelectOfScalar[Exclusion], request: PageRequest
) -> Page[Exclusion]:
    return await keyset_page(
        session,
        stmt,
        [col(Exclusion.created_at), col(Exclusion.id)],
        lambda e: (e.created_at, e.id),
        request,
        descending=True,
    )


async def excluded_values(session: AsyncSession, workspace_id: uuid.UUID) -> set[str]:
    rows = await session.scalars(
        select(Exclusion.value).where(Exclusion.workspace_id == workspace_id)
    )
    return set(rows)
