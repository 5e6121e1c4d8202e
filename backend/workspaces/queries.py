from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.kit.addresses import normalize_address
from backend.mailboxes.tables import Mailbox
from backend.workspaces.tables import User, Workspace


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


async def own_addresses(session: AsyncSession, workspace_id: uuid.UUID) -> dict[str, uuid.UUID]:
    """Every address that belongs to a user of the workspace (R1), mapped to that user."""
    owners: dict[str, uuid.UUID] = {}
    for mailbox in await session.scalars(
        select(Mailbox).where(Mailbox.workspace_id == workspace_id)
    ):
        for address in [mailbox.email_address, *mailbox.aliases]:
            owners.setdefault(normalize_address(address), mailbox.owner_id)
    for user in await session.scalars(select(User).where(User.workspace_id == workspace_id)):
        owners[normalize_address(user.email)] = user.id
    return owners
