from __future__ import annotations

import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import User, Workspace
from backend.kit.addresses import normalize_address
from backend.kit.clock import now
from backend.kit.pagination import Page, PageRequest, keyset_page
from backend.mailboxes.tables import (
    Mailbox,
    MailboxStatus,
    ProviderIssue,
    SyncActivityDay,
    SyncErrorEntry,
)


async def mailboxes_by_ids(
    session: AsyncSession, workspace_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Mailbox]:
    rows = await session.scalars(
        select(Mailbox).where(col(Mailbox.id).in_(ids), Mailbox.workspace_id == workspace_id)
    )
    return {m.id: m for m in rows}


async def mailboxes_by_owner(
    session: AsyncSession, workspace_id: uuid.UUID, owner_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[Mailbox]]:
    rows = await session.scalars(
        select(Mailbox)
        .where(col(Mailbox.owner_id).in_(owner_ids), Mailbox.workspace_id == workspace_id)
        .order_by(col(Mailbox.created_at), col(Mailbox.id))
    )
    grouped: dict[uuid.UUID, list[Mailbox]] = defaultdict(list)
    for mailbox in rows:
        grouped[mailbox.owner_id].append(mailbox)
    return grouped


async def workspace_mailboxes(
    session: AsyncSession, workspace_id: uuid.UUID, owner_id: uuid.UUID | None = None
) -> list[Mailbox]:
    stmt = select(Mailbox).where(Mailbox.workspace_id == workspace_id)
    if owner_id is not None:
        stmt = stmt.where(Mailbox.owner_id == owner_id)
    return list(await session.scalars(stmt.order_by(col(Mailbox.created_at), col(Mailbox.id))))


async def counted_mailboxes(session: AsyncSession, workspace_id: uuid.UUID) -> int:
    """Mailboxes that take a place under the workspace's mailbox limit."""
    total = await session.scalar(
        select(sa.func.count())
        .select_from(Mailbox)
        .where(
            Mailbox.workspace_id == workspace_id,
            col(Mailbox.status).not_in([MailboxStatus.DISCONNECTED, MailboxStatus.PENDING_LIMIT]),
        )
    )
    return int(total or 0)


async def latest_errors(
    session: AsyncSession, mailbox_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, SyncErrorEntry]:
    newest = (
        select(SyncErrorEntry.mailbox_id, sa.func.max(SyncErrorEntry.occurred_at).label("at"))
        .where(col(SyncErrorEntry.mailbox_id).in_(mailbox_ids))
        .group_by(col(SyncErrorEntry.mailbox_id))
        .subquery()
    )
    rows = await session.scalars(
        select(SyncErrorEntry).join(
            newest,
            sa.and_(
                col(SyncErrorEntry.mailbox_id) == newest.c.mailbox_id,
                col(SyncErrorEntry.occurred_at) == newest.c.at,
            ),
        )
    )
    return {e.mailbox_id: e for e in rows}


async def errors_page(
    session: AsyncSession, mailbox_id: uuid.UUID, request: PageRequest
) -> Page[SyncErrorEntry]:
    return await keyset_page(
        session,
        select(SyncErrorEntry).where(SyncErrorEntry.mailbox_id == mailbox_id),
        [col(SyncErrorEntry.occurred_at), col(SyncErrorEntry.id)],
        lambda e: (e.occurred_at, e.id),
        request,
        descending=True,
    )


async def activity_totals(
    session: AsyncSession, mailbox_id: uuid.UUID, days: int
) -> tuple[int, int, int]:
    since = (now() - timedelta(days=max(days, 1) - 1)).date()
    row = (
        await session.execute(
            select(
                sa.func.coalesce(sa.func.sum(SyncActivityDay.queued), 0),
                sa.func.coalesce(sa.func.sum(SyncActivityDay.synced), 0),
                sa.func.coalesce(sa.func.sum(SyncActivityDay.failed), 0),
            ).where(SyncActivityDay.mailbox_id == mailbox_id, col(SyncActivityDay.day) >= since)
        )
    ).one()
    return int(row[0]), int(row[1]), int(row[2])


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


# workspace id -> (addresses_version, own addresses): the same for every request of a
# workspace until a trigger moves the version (migration 0008), so each process keeps it.
_OWN_ADDRESSES: OrderedDict[uuid.UUID, tuple[int, dict[str, uuid.UUID]]] = OrderedDict()
_OWN_ADDRESSES_KEPT = 1024


async def cached_own_addresses(
    session: AsyncSession, workspace_id: uuid.UUID
) -> dict[str, uuid.UUID]:
    """`own_addresses` for reads: one primary-key lookup while the workspace's addresses
    stay as they were. Callers must not change the mapping."""
    version = await session.scalar(
        select(Workspace.addresses_version).where(Workspace.id == workspace_id)
    )
    if version is None:
        return {}
    kept = _OWN_ADDRESSES.get(workspace_id)
    if kept is not None and kept[0] == version:
        _OWN_ADDRESSES.move_to_end(workspace_id)
        return kept[1]
    owners = await own_addresses(session, workspace_id)
    _OWN_ADDRESSES[workspace_id] = (version, owners)
    _OWN_ADDRESSES.move_to_end(workspace_id)
    while len(_OWN_ADDRESSES) > _OWN_ADDRESSES_KEPT:
        _OWN_ADDRESSES.popitem(last=False)
    return owners


# A provider issue not seen again for this long is no longer reported: its mailboxes were
# disconnected, or suspended after 48 hours of failing (R13), and nothing retries it.
PROVIDER_ISSUE_WINDOW = timedelta(hours=48)


async def provider_issues(session: AsyncSession) -> list[ProviderIssue]:
    """Providers refusing mailsync's configuration (passes, push) recently, for the health
    checks."""
    rows = await session.scalars(
        select(ProviderIssue)
        .where(col(ProviderIssue.last_seen_at) >= now() - PROVIDER_ISSUE_WINDOW)
        .order_by(col(ProviderIssue.provider), col(ProviderIssue.problem))
    )
    return list(rows)
