from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.service import Viewer
from backend.auth.tables import User, Workspace
from backend.db import table_of
from backend.kit.addresses import normalize_address
from backend.kit.clock import now
from backend.kit.crypto import decrypt_json, encrypt_json
from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, NotFound, ServiceError
from backend.mail import service as mail_service
from backend.mailboxes import access, queries
from backend.mailboxes.tables import (
    EmailVisibility,
    Mailbox,
    MailboxStatus,
    ProviderIssue,
    ProviderProblem,
    SyncErrorEntry,
    SyncMode,
)
from backend.providers.base import Provider, ProviderConfigurationError


def status_event(mailbox: Mailbox, previous: MailboxStatus) -> dict[str, Any]:
    return {
        "type": "mailboxStatusChanged",
        "mailboxId": str(mailbox.id),
        "previousStatus": previous.value,
        "status": mailbox.status.value,
    }


def set_status(mailbox: Mailbox, status: MailboxStatus, effects: AfterCommit) -> None:
    """Every status change is published (R13) once the transaction commits."""
    if mailbox.status == status:
        return
    previous = mailbox.status
    mailbox.status = status
    effects.publish(mailbox.workspace_id, status_event(mailbox, previous))


def read_credentials(secret: bytes, mailbox: Mailbox) -> dict[str, Any]:
    if mailbox.credentials_encrypted is None:
        return {}
    return decrypt_json(secret, mailbox.credentials_encrypted)


def write_credentials(secret: bytes, mailbox: Mailbox, credentials: dict[str, Any]) -> None:
    mailbox.credentials_encrypted = encrypt_json(secret, credentials)


async def visible_mailboxes(session: AsyncSession, viewer: Viewer) -> list[Mailbox]:
    """The viewer's own mailboxes; owners and admins see the whole workspace's."""
    return await queries.workspace_mailboxes(
        session, viewer.workspace_id, access.listed_owner(viewer)
    )


async def get_managed(
    session: AsyncSession, viewer: Viewer, mailbox_id: uuid.UUID | None
) -> Mailbox:
    mailbox = await session.get(Mailbox, mailbox_id) if mailbox_id else None
    if mailbox is None or not access.can_manage(viewer, mailbox):
        raise NotFound("Mailbox", ["id"])
    return mailbox


async def _has_room(session: AsyncSession, workspace: Workspace) -> bool:
    if workspace.mailbox_limit is None:
        return True
    return await queries.counted_mailboxes(session, workspace.id) < workspace.mailbox_limit


async def connect_mailbox(
    session: AsyncSession,
    effects: AfterCommit,
    secret: bytes,
    *,
    owner: User,
    provider: Provider,
    email_address: str,
    credentials: dict[str, Any],
    aliases: Sequence[str] = (),
    sync_mode: SyncMode = SyncMode.TWO_WAY,
) -> Mailbox:
    """A newly connected mailbox: PENDING, or PENDING_LIMIT while the workspace is full (R13)."""
    workspace = await session.get(Workspace, owner.workspace_id)
    if workspace is None:
        raise NotFound("Workspace")
    address = normalize_address(email_address)
    existing = (
        await session.scalars(
            select(Mailbox).where(
                Mailbox.workspace_id == workspace.id,
                Mailbox.email_address == address,
                Mailbox.provider == provider,
                Mailbox.status != MailboxStatus.DISCONNECTED,
            )
        )
    ).first()
    if existing is not None:
        raise ServiceError(
            ErrorCode.ALREADY_CONNECTED, f"{address} is already connected.", ["emailAddress"]
        )
    mailbox = Mailbox(
        workspace_id=workspace.id,
        owner_id=owner.id,
        provider=provider,
        email_address=address,
        aliases=[normalize_address(a) for a in aliases if normalize_address(a) != address],
        sync_mode=sync_mode,
        status=MailboxStatus.PENDING
        if await _has_room(session, workspace)
        else MailboxStatus.PENDING_LIMIT,
        connected_at=now(),
    )
    write_credentials(secret, mailbox, credentials)
    session.add(mailbox)
    await session.flush()
    if mailbox.status == MailboxStatus.PENDING:
        effects.request_sync(mailbox.id)
    return mailbox


async def revive(session: AsyncSession, effects: AfterCommit, mailbox: Mailbox) -> None:
    """Fresh credentials: forget the failure streak and sync again (R13: reconnect ends
    ERROR and SUSPENDED)."""
    workspace = await session.get(Workspace, mailbox.workspace_id)
    counted = mailbox.status not in (MailboxStatus.DISCONNECTED, MailboxStatus.PENDING_LIMIT)
    room = counted or workspace is None or await _has_room(session, workspace)
    mailbox.failing_since = None
    mailbox.consecutive_failures = 0
    mailbox.next_attempt_at = None
    mailbox.disconnected_at = None
    mailbox.push_renewed_at = None
    set_status(mailbox, MailboxStatus.PENDING if room else MailboxStatus.PENDING_LIMIT, effects)
    session.add(mailbox)
    await session.flush()
    if mailbox.status == MailboxStatus.PENDING:
        effects.request_sync(mailbox.id)


async def update_mailbox(
    session: AsyncSession,
    viewer: Viewer,
    mailbox_id: uuid.UUID | None,
    *,
    sync_mode: SyncMode | None,
    visibility: EmailVisibility | None,
) -> Mailbox:
    mailbox = await get_managed(session, viewer, mailbox_id)
    if sync_mode is not None:
        mailbox.sync_mode = sync_mode
    if visibility is not None:
        mailbox.visibility = visibility
    session.add(mailbox)
    await session.flush()
    return mailbox


async def request_sync(
    session: AsyncSession, viewer: Viewer, effects: AfterCommit, mailbox_id: uuid.UUID | None
) -> Mailbox:
    mailbox = await get_managed(session, viewer, mailbox_id)
    if mailbox.status == MailboxStatus.DISCONNECTED:
        raise ServiceError(
            ErrorCode.MAILBOX_DISCONNECTED,
            "This mailbox is disconnected: connect it again to sync.",
        )
    if mailbox.status == MailboxStatus.SUSPENDED:
        raise ServiceError(
            ErrorCode.MAILBOX_SUSPENDED,
            "Sync is suspended after 48 hours of failures: reconnect the mailbox.",
        )
    if mailbox.status == MailboxStatus.PENDING_LIMIT:
        raise ServiceError(
            ErrorCode.LIMIT_REACHED,
            "The workspace is at its mailbox limit; this mailbox starts when room frees up.",
        )
    effects.request_sync(mailbox.id)
    return mailbox


async def disconnect_mailbox(
    session: AsyncSession,
    viewer: Viewer,
    effects: AfterCommit,
    mailbox_id: uuid.UUID | None,
    *,
    erase: bool = False,
) -> Mailbox:
    mailbox = await get_managed(session, viewer, mailbox_id)
    if mailbox.status == MailboxStatus.DISCONNECTED and not erase:
        return mailbox
    set_status(mailbox, MailboxStatus.DISCONNECTED, effects)
    mailbox.next_attempt_at = None
    mailbox.disconnected_at = now()
    session.add(mailbox)
    await session.flush()
    # The mailbox's job stops the provider's pushes with the credentials, then drops them.
    effects.request_sync(mailbox.id)
    if erase:
        await mail_service.erase_mailbox_history(session, mailbox.id)
    await promote_waiting(session, mailbox.workspace_id, effects)
    return mailbox


async def promote_waiting(
    session: AsyncSession, workspace_id: uuid.UUID, effects: AfterCommit
) -> None:
    """PENDING_LIMIT mailboxes start by themselves, oldest first, as room frees up (R13)."""
    workspace = await session.get(Workspace, workspace_id)
    if workspace is None:
        return
    waiting = list(
        await session.scalars(
            select(Mailbox)
            .where(
                Mailbox.workspace_id == workspace_id, Mailbox.status == MailboxStatus.PENDING_LIMIT
            )
            .order_by(col(Mailbox.created_at), col(Mailbox.id))
        )
    )
    for mailbox in waiting:
        if not await _has_room(session, workspace):
            break
        set_status(mailbox, MailboxStatus.PENDING, effects)
        session.add(mailbox)
        await session.flush()
        effects.request_sync(mailbox.id)


# The detail every configuration error's entry starts with (ProviderConfigurationError).
CONFIGURATION_DETAIL = "configuration:"


async def note_provider_issue(
    session: AsyncSession,
    provider: Provider,
    error: ProviderConfigurationError,
    problem: ProviderProblem = ProviderProblem.CONFIGURATION,
) -> None:
    """A pass failed (or its push renewal was refused) because the provider refuses
    mailsync's configuration: the operator's health checks list the provider and problem
    until `clear_provider_issue` (`clear_push_issue`). Passes of many mailboxes fail so at
    once, in as many workers, hence one upsert rather than a read then a write."""
    moment = now()
    values = {
        "provider": provider,
        "problem": problem,
        "fix": error.fix,
        "detail": error.detail[:2000],
        "first_seen_at": moment,
        "last_seen_at": moment,
        "failures": 1,
    }
    dialect = session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(ProviderIssue)
    table = table_of(ProviderIssue)
    await session.execute(
        insert.values(**values).on_conflict_do_update(
            index_elements=["provider", "problem"],
            set_={
                "fix": error.fix,
                "detail": values["detail"],
                "last_seen_at": moment,
                "failures": table.c.failures + 1,
            },
        )
    )


async def clear_provider_issue(
    session: AsyncSession, mailbox_id: uuid.UUID, provider: Provider, failing_since: datetime
) -> None:
    """The mailbox's pass succeeded. If its failure streak had a configuration error, the
    configuration works again and the provider's issue is cleared. A mailbox that did not
    fail proves nothing: its access token may simply not have needed refreshing yet."""
    failed_so = await session.scalar(
        select(sa.literal(1))
        .where(
            col(SyncErrorEntry.mailbox_id) == mailbox_id,
            col(SyncErrorEntry.occurred_at) >= failing_since,
            col(SyncErrorEntry.detail).startswith(CONFIGURATION_DETAIL, autoescape=True),
        )
        .limit(1)
    )
    if failed_so:
        await session.execute(
            sa.delete(ProviderIssue).where(
                col(ProviderIssue.provider) == provider,
                col(ProviderIssue.problem) == ProviderProblem.CONFIGURATION,
            )
        )


async def clear_push_issue(session: AsyncSession, provider: Provider) -> None:
    """A watch succeeded: the topic (one per deployment) takes the provider's pushes again."""
    await session.execute(
        sa.delete(ProviderIssue).where(
            col(ProviderIssue.provider) == provider,
            col(ProviderIssue.problem) == ProviderProblem.PUSH,
        )
    )
