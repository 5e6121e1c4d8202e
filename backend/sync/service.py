"""The steps of a sync pass of one mailbox (`sync/jobs.run_pass` runs them, each write in a short
transaction of its own): load, list changes, save a large change set as a backlog, file batch
by batch, finish with the cursor and the status."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import Workspace
from backend.db import is_deadlock, table_of
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mailboxes.service import (
    clear_provider_issue,
    clear_push_issue,
    note_provider_issue,
    read_credentials,
    set_status,
    write_credentials,
)
from backend.mailboxes.tables import (
    Mailbox,
    MailboxStatus,
    ProviderProblem,
    SyncActivityDay,
    SyncErrorEntry,
    SyncMode,
)
from backend.providers.base import (
    ChangeSet,
    CursorInvalid,
    FetchedMessage,
    MailboxAccount,
    MailProvider,
    MessageRef,
    ProviderConfigurationError,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.providers.registry import provider_for
from backend.sync.filing import FilingContext
from backend.sync.ingest import Outcome, ingest_batch, workspace_filing_context
from backend.sync.parsing import ParsedMessage, parse_many
from backend.sync.status import MESSAGES, SUSPEND_AFTER, backoff
from backend.sync.tables import SyncBacklog

if TYPE_CHECKING:
    from backend.runtime import Work
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
class PassStart:
    """What a pass reads before it talks to the provider, in one statement."""

    mailbox: Mailbox
    workspace: Workspace
    # An earlier pass saved work it did not finish (see `save_backlog`).
    backlog: bool


async def load_pass(session: AsyncSession, mailbox_id: uuid.UUID) -> PassStart | None:
    pending = (
        sa.exists()
        .where(col(SyncBacklog.mailbox_id) == col(Mailbox.id))
        .correlate(table_of(Mailbox))
        .label("backlog")
    )
    row = (
        await session.execute(
            select(Mailbox, Workspace, pending)
            .join(Workspace, col(Workspace.id) == col(Mailbox.workspace_id))
            .where(col(Mailbox.id) == mailbox_id)
        )
    ).one_or_none()
    if row is None:
        return None
    mailbox, workspace, backlog = row
    return PassStart(mailbox, workspace, bool(backlog))


@dataclass
class Progress:
    """What a pass has done so far; batches are committed as they go, so a pass that fails
    later still reports what it filed."""

    filed: int = 0
    failed: int = 0
    duplicates: int = 0
    # Provider ids of this pass's messages that are on a timeline (to tag in the mailbox).
    on_timeline: list[str] = field(default_factory=list)


async def filing_rules(
    session: AsyncSession, mailbox: Mailbox
) -> tuple[Workspace, FilingContext] | None:
    """The workspace and the filing rules as they are now (exclusions R4, own addresses R1,
    auto-creation R5, the sync mode R12), read in each batch's transaction: a pass runs for
    minutes, and a rule changed meanwhile (an exclusion purging what it filed) must hold for
    the batches that follow. None: the mailbox is gone."""
    row = (
        await session.execute(
            select(Workspace, Mailbox.sync_mode)
            .join(Mailbox, col(Mailbox.workspace_id) == col(Workspace.id))
            .where(col(Mailbox.id) == mailbox.id)
        )
    ).one_or_none()
    if row is None:
        return None
    workspace, sync_mode = row
    return workspace, await workspace_filing_context(session, workspace, SyncMode(sync_mode))


async def list_changes(provider: MailProvider, mailbox: Mailbox) -> ChangeSet:
    """What changed since the mailbox's cursor; a cursor the provider no longer accepts
    becomes a full re-list since the connection (R7 files nothing twice)."""
    try:
        return await provider.list_changes(mailbox.cursor, mailbox.connected_at)
    except CursorInvalid:
        return await provider.list_changes(None, mailbox.connected_at)


def batches_of(refs: Sequence[MessageRef]) -> list[Sequence[MessageRef]]:
    return [refs[start : start + FETCH_BATCH] for start in range(0, len(refs), FETCH_BATCH)]


async def save_backlog(
    session: AsyncSession, mailbox: Mailbox, changes: ChangeSet, sealed: str | None
) -> list[tuple[int, MessageRef]] | None:
    """Add the change set to what earlier passes left undone and move the cursor past it, in
    one transaction; answer the whole backlog, in order (positions with their refs). Each
    filed batch then deletes its rows (`file_batch`), so a pass that dies after some batches
    is resumed by the next one where it stopped. None: the mailbox stopped syncing or was
    reconnected (`same_connection`)."""
    rows = (
        await session.execute(
            select(SyncBacklog.position, SyncBacklog.provider_id, SyncBacklog.thread_id)
            .where(col(SyncBacklog.mailbox_id) == mailbox.id)
            .order_by(col(SyncBacklog.position))
        )
    ).all()
    backlog = [(position, MessageRef(pid, thread)) for position, pid, thread in rows]
    known = {ref.provider_id for _, ref in backlog}
    position = backlog[-1][0] + 1 if backlog else 0
    added: list[dict[str, Any]] = []
    for ref in changes.refs:
        if ref.provider_id in known:  # listed again since: fetched once
            continue
        known.add(ref.provider_id)
        backlog.append((position, ref))
        added.append(
            {
                "mailbox_id": mailbox.id,
                "position": position,
                "provider_id": ref.provider_id,
                "thread_id": ref.thread_id,
            }
        )
        position += 1
    moved = await session.execute(
        sa.update(Mailbox)
        .where(
            col(Mailbox.id) == mailbox.id,
            col(Mailbox.status).in_(SYNCABLE),
            same_connection(sealed),
        )
        .values(cursor=changes.cursor)
    )
    if _rowcount(moved) != 1:
        return None
    if added:
        await session.execute(sa.insert(table_of(SyncBacklog)), added)
    mailbox.cursor = changes.cursor
    return backlog


def same_connection(sealed: str | None) -> sa.ColumnElement[bool]:
    """The mailbox still holds the credentials the pass knows (those it loaded or stored
    itself): a reconnect writes others, and what a pass learnt of the old connection (its
    cursor, its push registration, its status) must not overwrite the new one."""
    column = col(Mailbox.credentials_encrypted)
    return column.is_(None) if sealed is None else column == sealed


def _rowcount(result: Any) -> int:
    count: int = result.rowcount
    return count


async def file_batch(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    prepared: list[Prepared],
    progress: Progress,
    backlog_through: int | None,
) -> None:
    """File one fetched batch and count it; `backlog_through`: the last backlog position the
    batch covers, deleted with it."""
    failed = filed = 0
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
            progress.duplicates += 1
        if outcome in ON_TIMELINE:
            progress.on_timeline.append(fetched.ref.provider_id)
    if backlog_through is not None:
        await session.execute(
            sa.delete(SyncBacklog).where(
                col(SyncBacklog.mailbox_id) == mailbox.id,
                col(SyncBacklog.position) <= backlog_through,
            )
        )
    await count_activity(session, mailbox.id, queued=len(prepared), synced=filed, failed=failed)
    progress.filed += filed
    progress.failed += failed


# A fetched message and its parse, or what went wrong: a read error (no message) or the
# exception that parsing raised.
Prepared = tuple[MessageRef, FetchedMessage | None, ParsedMessage | BaseException]


async def fetch_and_parse(
    provider: MailProvider, refs: Sequence[MessageRef], processes: int
) -> list[Prepared]:
    """Fetch a batch and parse it off the event loop (parse processes, `parse_many`)."""
    fetched = await provider.fetch(refs)
    parsed = iter(
        await parse_many([i.raw for i in fetched if not isinstance(i, ProviderError)], processes)
    )
    out: list[Prepared] = []
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
        if is_deadlock(exc):
            # Nothing is wrong with these messages: the pass fails (transient) and files them
            # again, rather than record them as IMPORT_FAILED.
            raise
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


async def renew_push(
    provider: MailProvider,
    mailbox: Mailbox,
    unit_of_work: Callable[[], AbstractAsyncContextManager[Work]],
) -> None:
    """Start the provider's push on the first pass and renew it daily (Gmail asks for at
    least weekly). Push only speeds sync up, so a failure here never fails the pass. A
    refusal of mailsync's configuration (Gmail may not publish to the topic) is the
    operator's: the health checks list it (problem "push") until a later watch succeeds."""
    moment = now()
    if mailbox.push_renewed_at is not None and moment - mailbox.push_renewed_at < PUSH_RENEWAL:
        return
    try:
        renewed = await provider.subscribe() is not None
    except ProviderConfigurationError as exc:
        # push_renewed_at stays unset, so every pass tries again: the entry stays fresh
        # while the refusal lasts and clears on the first watch after the fix.
        async with unit_of_work() as work:
            await note_provider_issue(work.session, mailbox.provider, exc, ProviderProblem.PUSH)
        return
    except ProviderError as exc:
        log.warning("mailbox %s: could not start push notifications: %s", mailbox.id, exc)
        return
    if renewed:
        mailbox.push_renewed_at = moment
        # The topic is the deployment's, not the mailbox's: any watch accepted proves it.
        async with unit_of_work() as work:
            await clear_push_issue(work.session, mailbox.provider)


async def label_synced(
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
    """The credentials of a pass. `sealed`: what the mailbox row holds as far as the pass
    knows (loaded, or stored by its own credential store), which its writes check (see
    `same_connection`). `refreshed`: what the provider refreshed and nobody stored yet, saved
    whether the pass succeeds or not; what the credential store saved is never written again,
    since another process may have rotated it since."""

    sealed: str | None = None
    refreshed: dict[str, Any] | None = None


async def finish_pass(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    mailbox: Mailbox,
    cursor: dict[str, Any] | None,
    credentials: PassCredentials,
    progress: Progress,
    started: datetime,
) -> PassResult | None:
    """The pass succeeded: its cursor (unless the backlog already saved it), status (R13) and
    refreshed credentials, in one statement that also checks the mailbox still syncs with the
    same connection (None: it was disconnected or reconnected meanwhile, and the caller drops
    the transaction, with the status event built from what the pass loaded)."""
    if cursor is not None:
        mailbox.cursor = cursor
    if credentials.refreshed is not None:
        write_credentials(settings.secret, mailbox, credentials.refreshed)
    # Before `_succeeded` forgets it: whether this pass ends a configuration failure.
    failing_since = mailbox.failing_since
    _succeeded(mailbox, progress.filed, effects)
    values: dict[str, Any] = {
        "last_synced_at": mailbox.last_synced_at,
        "last_email_synced_at": mailbox.last_email_synced_at,
        "failing_since": None,
        "consecutive_failures": 0,
        "next_attempt_at": None,
        "status": mailbox.status,
        "push_renewed_at": mailbox.push_renewed_at,
    }
    if cursor is not None:
        values["cursor"] = cursor
    if credentials.refreshed is not None:
        values["credentials_encrypted"] = mailbox.credentials_encrypted
    done = await session.execute(
        sa.update(Mailbox)
        .where(
            col(Mailbox.id) == mailbox.id,
            col(Mailbox.status).in_(SYNCABLE),
            same_connection(credentials.sealed),
        )
        .values(**values)
    )
    if _rowcount(done) != 1:
        return None
    if failing_since is not None:
        await clear_provider_issue(session, mailbox.id, mailbox.provider, failing_since)
    credentials.sealed = mailbox.credentials_encrypted
    result = PassResult(
        mailbox.id, progress.filed, progress.failed, progress.duplicates, started, now()
    )
    effects.notify(mailbox.workspace_id, result.event())
    return result


def record_failure(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    mailbox: Mailbox,
    error: ProviderError,
    credentials: PassCredentials,
    started: datetime,
    progress: Progress | None = None,
) -> PassResult | None:
    """A failed pass: its error, the backoff or suspension (R13), and the credentials the
    provider refreshed before failing. `progress`: the batches it filed before it failed.
    `mailbox`: loaded for update. None: reconnected meanwhile, so the failure of the old
    connection is nobody's concern."""
    if mailbox.credentials_encrypted != credentials.sealed:
        return None
    if credentials.refreshed is not None:
        write_credentials(settings.secret, mailbox, credentials.refreshed)
    _failed(session, mailbox, error, effects)
    session.add(mailbox)
    done = progress or Progress()
    result = PassResult(mailbox.id, done.filed, done.failed, done.duplicates, started, now(), error)
    effects.notify(mailbox.workspace_id, result.event())
    return result


async def stop_pushes(settings: Settings, mailbox: Mailbox) -> None:
    """A disconnected mailbox: stop the provider's pushes (Gmail watch, Graph subscription).
    Run as the mailbox's pass, so never beside one, and outside any transaction."""
    if mailbox.credentials_encrypted is None:
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


async def forget_provider_side(session: AsyncSession, mailbox: Mailbox) -> None:
    """After `stop_pushes`: forget the credentials, only if nobody reconnected the mailbox
    meanwhile (that writes new credentials). The backlog stays: the cursor already moved past
    its refs, and reconnecting the same account resumes from that cursor (R6, R7); a reconnect
    to another address clears both (`mailboxes/connect._reconnect`)."""
    sealed = mailbox.credentials_encrypted
    if sealed is None:
        return
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
