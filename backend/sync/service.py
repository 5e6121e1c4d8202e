"""One sync pass of one mailbox: list changes, fetch, file, then save the cursor with the mail."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import Workspace
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mailboxes.service import read_credentials, set_status, write_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus, SyncActivityDay, SyncErrorEntry
from backend.providers.base import (
    CursorInvalid,
    FetchedMessage,
    MailboxAccount,
    MailProvider,
    MessageRef,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.providers.registry import provider_for
from backend.sync.filing import FilingContext
from backend.sync.ingest import Outcome, filing_context, ingest_batch
from backend.sync.parsing import ParsedMessage, parse_many
from backend.sync.status import MESSAGES, SUSPEND_AFTER, backoff

if TYPE_CHECKING:
    from backend.settings import Settings

log = logging.getLogger(__name__)

SYNCABLE = {MailboxStatus.PENDING, MailboxStatus.ACTIVE, MailboxStatus.ERROR}
FETCH_BATCH = 50
PUSH_RENEWAL = timedelta(days=1)
SYNCED_MAIL_LABEL = "CRM"
# A duplicate is already stored, hence filed, so its copy in this mailbox is synced mail too.
ON_TIMELINE = {Outcome.FILED, Outcome.DUPLICATE}


@dataclass
class PassResult:
    mailbox_id: uuid.UUID
    filed: int
    failed: int
    duplicates: int
    started_at: datetime
    finished_at: datetime
    error: ProviderError | None = None

    def event(self) -> dict[str, Any]:
        return {
            "type": "syncPassCompleted",
            "mailboxId": str(self.mailbox_id),
            "filed": self.filed,
            "failed": self.failed,
            "startedAt": self.started_at.isoformat(),
            "finishedAt": self.finished_at.isoformat(),
        }


def record_error(
    session: AsyncSession, mailbox_id: uuid.UUID, code: SyncErrorCode, detail: str | None
) -> None:
    message, recommendation = MESSAGES[code]
    session.add(
        SyncErrorEntry(
            mailbox_id=mailbox_id,
            code=code,
            message=message,
            recommendation=recommendation,
            detail=detail,
        )
    )


async def count_activity(
    session: AsyncSession,
    mailbox_id: uuid.UUID,
    *,
    queued: int = 0,
    synced: int = 0,
    failed: int = 0,
) -> None:
    today = now().date()
    row = await session.get(SyncActivityDay, (mailbox_id, today))
    if row is None:
        row = SyncActivityDay(mailbox_id=mailbox_id, day=today)
    row.queued += queued
    row.synced += synced
    row.failed += failed
    session.add(row)


@dataclass
class _Filed:
    filed: int
    failed: int
    duplicates: int
    cursor: dict[str, Any]
    # Provider ids of this pass's messages that are on a timeline (to tag in the mailbox).
    on_timeline: list[str]


async def _file_all(
    session: AsyncSession,
    effects: AfterCommit,
    provider: MailProvider,
    workspace: Workspace,
    mailbox: Mailbox,
    parse_processes: int = 0,
) -> _Filed:
    try:
        changes = await provider.list_changes(mailbox.cursor, mailbox.connected_at)
    except CursorInvalid:
        changes = await provider.list_changes(None, mailbox.connected_at)
    ctx = await filing_context(session, workspace, mailbox)
    filed = failed = duplicates = 0
    on_timeline: list[str] = []
    batches = [
        changes.refs[start : start + FETCH_BATCH]
        for start in range(0, len(changes.refs), FETCH_BATCH)
    ]
    # The next batch is fetched and parsed while this one is stored: parsing is the CPU
    # cost of a pass and storing mostly waits on the database, so the two overlap.
    upcoming = (
        asyncio.ensure_future(_fetch_and_parse(provider, batches[0], parse_processes))
        if batches
        else None
    )
    try:
        for index in range(len(batches)):
            assert upcoming is not None
            prepared = await upcoming
            upcoming = (
                asyncio.ensure_future(
                    _fetch_and_parse(provider, batches[index + 1], parse_processes)
                )
                if index + 1 < len(batches)
                else None
            )
            parsed: list[tuple[FetchedMessage, ParsedMessage]] = []
            for ref, item, result in prepared:
                if isinstance(result, ParsedMessage):
                    assert item is not None
                    parsed.append((item, result))
                    continue
                failed += 1
                if item is None:
                    record_error(
                        session,
                        mailbox.id,
                        SyncErrorCode.READ_FAILED,
                        f"message {ref.provider_id}: {result}",
                    )
                else:
                    _import_failed(session, mailbox, item, result)
            outcomes = await _file_parsed(session, effects, workspace, mailbox, ctx, parsed)
            for (fetched, _), outcome in zip(parsed, outcomes, strict=True):
                if outcome is None:
                    failed += 1
                    continue
                if outcome == Outcome.FILED:
                    filed += 1
                elif outcome == Outcome.DUPLICATE:
                    duplicates += 1
                if outcome in ON_TIMELINE:
                    on_timeline.append(fetched.ref.provider_id)
    finally:
        if upcoming is not None and not upcoming.done():
            upcoming.cancel()
    await count_activity(session, mailbox.id, queued=len(changes.refs), synced=filed, failed=failed)
    return _Filed(filed, failed, duplicates, changes.cursor, on_timeline)


# A fetched message and its parse, or what went wrong: a read error (no message) or the
# exception that parsing raised.
_Prepared = tuple[MessageRef, FetchedMessage | None, ParsedMessage | BaseException]


async def _fetch_and_parse(
    provider: MailProvider, refs: Sequence[MessageRef], processes: int
) -> list[_Prepared]:
    """Fetch a batch and parse it off the event loop (parse processes, `parse_many`)."""
    fetched = await provider.fetch(refs)
    parsed = iter(
        await parse_many([i.raw for i in fetched if not isinstance(i, ProviderError)], processes)
    )
    out: list[_Prepared] = []
    for ref, item in zip(refs, fetched, strict=True):
        if isinstance(item, ProviderError):
            out.append((ref, None, item))
        else:
            out.append((ref, item, next(parsed)))
    return out


def _import_failed(
    session: AsyncSession, mailbox: Mailbox, item: FetchedMessage, exc: BaseException
) -> None:
    log.warning(
        "mailbox %s: could not import message %s: %r", mailbox.id, item.ref.provider_id, exc
    )
    record_error(
        session, mailbox.id, SyncErrorCode.IMPORT_FAILED, f"message {item.ref.provider_id}"
    )


async def _file_parsed(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    parsed: list[tuple[FetchedMessage, ParsedMessage]],
) -> list[Outcome | None]:
    """File a batch; if the batch cannot be stored, file it one message at a time so that only
    the message at fault ends as IMPORT_FAILED (None), never the pass."""
    if not parsed:
        return []
    marks = effects.marks()
    try:
        return [
            r.outcome for r in await ingest_batch(session, effects, workspace, mailbox, ctx, parsed)
        ]
    except Exception as exc:
        effects.drop_after(marks)
        if len(parsed) == 1:
            _import_failed(session, mailbox, parsed[0][0], exc)
            return [None]
    outcomes: list[Outcome | None] = []
    for one in parsed:
        outcomes.extend(await _file_parsed(session, effects, workspace, mailbox, ctx, [one]))
    return outcomes


def _succeeded(mailbox: Mailbox, filed: int, effects: AfterCommit) -> None:
    finished = now()
    mailbox.last_synced_at = finished
    if filed:
        mailbox.last_email_synced_at = finished
    mailbox.failing_since = None
    mailbox.consecutive_failures = 0
    mailbox.next_attempt_at = None
    # R13: PENDING until the first email is filed, then ACTIVE.
    target = MailboxStatus.ACTIVE if mailbox.last_email_synced_at else MailboxStatus.PENDING
    set_status(mailbox, target, effects)


def _failed(
    session: AsyncSession, mailbox: Mailbox, error: ProviderError, effects: AfterCommit
) -> None:
    moment = now()
    mailbox.failing_since = mailbox.failing_since or moment
    mailbox.consecutive_failures += 1
    record_error(session, mailbox.id, error.code, error.detail[:2000])
    if moment - mailbox.failing_since >= SUSPEND_AFTER:
        mailbox.next_attempt_at = None
        set_status(mailbox, MailboxStatus.SUSPENDED, effects)
        return
    retry_after = error.retry_after if isinstance(error, TransientProviderError) else None
    mailbox.next_attempt_at = moment + backoff(mailbox.consecutive_failures, retry_after)
    set_status(mailbox, MailboxStatus.ERROR, effects)


def provider_for_mailbox(settings: Settings, mailbox: Mailbox) -> MailProvider:
    """The adapter serving a mailbox, with its decrypted credentials."""
    account = MailboxAccount(id=str(mailbox.id), email_address=mailbox.email_address)
    credentials = read_credentials(settings.secret, mailbox)
    return provider_for(mailbox.provider, account, credentials, settings)


async def _renew_push(provider: MailProvider, mailbox: Mailbox) -> None:
    """Start the provider's push on the first pass and renew it daily (Gmail asks for at
    least weekly). Push only speeds sync up, so a failure here never fails the pass."""
    moment = now()
    if mailbox.push_renewed_at is not None and moment - mailbox.push_renewed_at < PUSH_RENEWAL:
        return
    try:
        if await provider.subscribe() is not None:
            mailbox.push_renewed_at = moment
    except ProviderError as exc:
        log.warning("mailbox %s: could not start push notifications: %s", mailbox.id, exc)


async def _label_synced(
    provider: MailProvider, workspace: Workspace, mailbox: Mailbox, provider_ids: list[str]
) -> None:
    """Tag filed mail in the user's mailbox when the workspace asks for it. The tag is a
    convenience for the user, so a failure is logged and never fails the pass."""
    if not workspace.label_synced_mail or not provider_ids:
        return
    try:
        await provider.mark(provider_ids, SYNCED_MAIL_LABEL)
    except ProviderError as exc:
        log.warning(
            "mailbox %s: could not label %d synced messages: %s", mailbox.id, len(provider_ids), exc
        )


@dataclass
class PassCredentials:
    """Credentials a provider refreshed during the pass: saved whether the pass succeeds or not
    (Microsoft rotates refresh tokens, so losing one loses access)."""

    refreshed: dict[str, Any] | None = None


async def sync_pass(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    workspace: Workspace,
    mailbox: Mailbox,
    credentials: PassCredentials,
    started: datetime,
    provider: MailProvider,
) -> PassResult:
    """File what changed since the cursor and move the cursor with it; raises ProviderError
    when the pass fails (the caller rolls back and records it with `record_failure`). The
    caller owns (and closes) the provider."""
    try:
        outcome = await _file_all(
            session, effects, provider, workspace, mailbox, settings.parse_processes
        )
        await _renew_push(provider, mailbox)
        await _label_synced(provider, workspace, mailbox, outcome.on_timeline)
    finally:
        credentials.refreshed = provider.updated_credentials()
    mailbox.cursor = outcome.cursor
    if credentials.refreshed is not None:
        write_credentials(settings.secret, mailbox, credentials.refreshed)
    _succeeded(mailbox, outcome.filed, effects)
    session.add(mailbox)
    await session.flush()
    result = PassResult(
        mailbox.id, outcome.filed, outcome.failed, outcome.duplicates, started, now()
    )
    effects.publish(mailbox.workspace_id, result.event())
    return result


def record_failure(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    mailbox: Mailbox,
    error: ProviderError,
    credentials: PassCredentials,
    started: datetime,
) -> PassResult:
    """A failed pass: its error, the backoff or suspension (R13), and the credentials the
    provider refreshed before failing."""
    if credentials.refreshed is not None:
        write_credentials(settings.secret, mailbox, credentials.refreshed)
    _failed(session, mailbox, error, effects)
    session.add(mailbox)
    result = PassResult(mailbox.id, 0, 0, 0, started, now(), error)
    effects.publish(mailbox.workspace_id, result.event())
    return result


async def release_provider_side(
    session: AsyncSession, settings: Settings, mailbox: Mailbox
) -> None:
    """A disconnected mailbox: stop the provider's pushes (Gmail watch, Graph subscription),
    then forget its credentials. Run as the mailbox's pass, so never beside one."""
    sealed = mailbox.credentials_encrypted
    if sealed is None:
        return
    try:
        provider = provider_for_mailbox(settings, mailbox)
        try:
            await provider.unsubscribe()
        finally:
            await provider.close()
    except ProviderError as exc:
        # Not worth keeping the credentials for: an unrenewed registration lapses by itself
        # within days, and the webhooks ignore disconnected mailboxes meanwhile.
        log.info("mailbox %s: pushes not stopped on disconnect: %s", mailbox.id, exc.detail)
    except Exception:
        log.exception("mailbox %s: stopping pushes on disconnect failed", mailbox.id)
    # Only if nobody reconnected the mailbox meanwhile (that writes new credentials).
    await session.execute(
        sa.update(Mailbox)
        .where(
            col(Mailbox.id) == mailbox.id,
            col(Mailbox.status) == MailboxStatus.DISCONNECTED,
            col(Mailbox.credentials_encrypted) == sealed,
        )
        .values(credentials_encrypted=None)
    )


async def due_mailboxes(session: AsyncSession, interval_seconds: int) -> list[uuid.UUID]:
    """R14: every syncing mailbox every `interval`, failing ones when their backoff ends, and
    disconnected ones whose provider side is not yet released."""
    moment = now()
    horizon = moment - timedelta(seconds=interval_seconds)
    rows = await session.execute(
        select(Mailbox.id, Mailbox.status, Mailbox.last_synced_at, Mailbox.next_attempt_at).where(
            sa.or_(
                col(Mailbox.status).in_(SYNCABLE),
                sa.and_(
                    col(Mailbox.status) == MailboxStatus.DISCONNECTED,
                    col(Mailbox.credentials_encrypted).is_not(None),
                ),
            )
        )
    )
    due: list[uuid.UUID] = []
    for mailbox_id, status, last_synced_at, next_attempt_at in rows:
        if status == MailboxStatus.DISCONNECTED:
            due.append(mailbox_id)
        elif status == MailboxStatus.ERROR:
            if next_attempt_at is None or next_attempt_at <= moment:
                due.append(mailbox_id)
        elif last_synced_at is None or last_synced_at <= horizon:
            due.append(mailbox_id)
    return due
