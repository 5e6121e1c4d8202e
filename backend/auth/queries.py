"""Reads of workspaces and users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import User, Workspace
from backend.kit.addresses import normalize_address


async def users_by_ids(
    session: AsyncSession, workspace_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, User]:
    rows = await session.scalars(
        select(User).where(col(User.id).in_(ids), User.workspace_id == workspace_id)
    )
    return {u.id: u for u in rows}


async def workspace_users(session: AsyncSession, workspace_id: uuid.UUID) -> list[User]:
    rows = await session.scalars(
        select(User)
        .where(User.workspace_id == workspace_id)
        .order_by(col(User.created_at), col(User.id))
    )
    return list(rows)


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    return (
        await session.scalars(select(User).where(User.email == normalize_address(email)))
    ).first()


async def workspace_by_id(session: AsyncSession, workspace_id: uuid.UUID) -> Workspace | None:
    return await session.get(Workspace, workspace_id)


async def workspace_by_name(session: AsyncSession, name: str) -> Workspace | None:
    return (await session.scalars(select(Workspace).where(Workspace.name == name))).first()
