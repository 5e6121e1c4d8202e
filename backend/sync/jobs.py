"""Worker jobs of the sync domain. They take ids, reload rows and are safe to run twice."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from backend.auth.tables import Workspace
from backend.kit.clock import now
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import ProviderError, SyncErrorCode, TransientProviderError
from backend.sync.queue import SyncQueue
from backend.sync.service import (
    SYNCABLE,
    PassCredentials,
    PassResult,
    due_mailboxes,
    record_failure,
    release_provider_side,
    sync_pass,
)

if TYPE_CHECKING:
    from backend.runtime import Runtime

log = logging.getLogger(__name__)


async def sync_mailbox(runtime: Runtime, mailbox_id: str) -> PassResult | None:
    try:
        row_id = uuid.UUID(mailbox_id)
    except ValueError:
        log.warning("ignoring a sync job for a malformed mailbox id %r", mailbox_id)
        return None
    return await run_pass(runtime, row_id)


async def run_pass(runtime: Runtime, mailbox_id: uuid.UUID) -> PassResult | None:
    """One pass, in its own unit of work; a failure rolls the pass back and is recorded in
    another. The job's id guarantees one pass per mailbox at a time (R14). Only the pass's own
    failures are recorded: one of the commit or the release after it fails the job instead,
    and arq retries it."""
    started = now()
    settings = runtime.settings
    credentials = PassCredentials()
    error: ProviderError
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        if mailbox is not None and mailbox.status == MailboxStatus.DISCONNECTED:
            await release_provider_side(work.session, settings, mailbox)
            return None
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None
        workspace = await work.session.get(Workspace, mailbox.workspace_id)
        if workspace is None:
            return None
        try:
            return await sync_pass(
                work.session, work.effects, settings, workspace, mailbox, credentials, started
            )
        except ProviderError as exc:
            error = exc
        except Exception as exc:
            log.exception("mailbox %s: sync pass failed unexpectedly", mailbox_id)
            error = TransientProviderError(f"unexpected: {exc!r}", SyncErrorCode.READ_FAILED)
        work.discard()
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None  # disconnected (or gone) meanwhile: its failure is nobody's concern
        return record_failure(
            work.session, work.effects, settings, mailbox, error, credentials, started
        )


async def after_sync(runtime: Runtime, mailbox_id: str) -> None:
    """A sync requested while this pass ran earns exactly one more pass (R14)."""
    await SyncQueue(runtime.redis).after_pass(mailbox_id)


async def schedule_due(runtime: Runtime) -> int:
    async with runtime.db.sessionmaker() as session:
        due = await due_mailboxes(session, runtime.settings.sync_interval_seconds)
    spread = runtime.settings.sync_spread_seconds
    for mailbox_id in due:
        # Spread the minute's passes instead of starting them all at once; the offset is
        # stable per mailbox, so each keeps its own rhythm.
        await runtime.jobs.enqueue_sync(
            str(mailbox_id), defer_seconds=mailbox_id.int % spread if spread else 0
        )
    return len(due)
