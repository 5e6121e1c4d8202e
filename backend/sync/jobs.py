"""Worker jobs of the sync domain. They take ids, reload rows and are safe to run twice."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from backend.auth.tables import Workspace
from backend.kit.clock import now
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import (
    MailProvider,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.sync.credentials import MailboxCredentialStore
from backend.sync.queue import SyncQueue
from backend.sync.service import (
    SYNCABLE,
    PassCredentials,
    PassResult,
    due_mailboxes,
    provider_for_mailbox,
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
    provider: MailProvider | None = None
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        if mailbox is not None and mailbox.status == MailboxStatus.DISCONNECTED:
            await release_provider_side(work.session, settings, mailbox)
            return None
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None
        try:
            provider = provider_for_mailbox(settings, mailbox)
        except ProviderError as exc:
            error: ProviderError = exc
        work.discard()
    if provider is not None:
        limit = settings.sync_pass_timeout_seconds
        try:
            # Our own limit, inside arq's (PASS_GRACE longer): a pass that overruns it is
            # rolled back, recorded like any failure (with its backoff, hence a retry) and
            # keeps the credentials it refreshed, instead of vanishing as a cancelled job.
            async with asyncio.timeout(limit):
                outcome = await _pass(runtime, mailbox_id, provider, credentials, started)
        except TimeoutError:
            log.warning("mailbox %s: the pass ran over %s s and was cancelled", mailbox_id, limit)
            outcome = TransientProviderError(
                f"the pass did not finish within {limit} seconds",
                SyncErrorCode.PROVIDER_UNAVAILABLE,
            )
        finally:
            await provider.close()
        if not isinstance(outcome, ProviderError):
            return outcome
        error = outcome
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None  # disconnected (or gone) meanwhile: its failure is nobody's concern
        return record_failure(
            work.session, work.effects, settings, mailbox, error, credentials, started
        )


async def _pass(
    runtime: Runtime,
    mailbox_id: uuid.UUID,
    provider: MailProvider,
    credentials: PassCredentials,
    started: datetime,
) -> PassResult | ProviderError | None:
    """The pass itself; its failure is returned, for `run_pass` to record (a failure of the
    commit itself is raised: the job fails and arq retries it)."""
    settings = runtime.settings
    store = MailboxCredentialStore(runtime.unit_of_work, settings.secret, mailbox_id)
    provider.credential_store = store
    # Credentials that would lapse during the pass are refreshed (and stored, in a
    # transaction of their own) before the pass's transaction opens.
    try:
        await provider.prepare(settings.sync_pass_timeout_seconds)
    except ProviderError as exc:
        return exc
    except Exception as exc:
        log.exception("mailbox %s: preparing the pass failed unexpectedly", mailbox_id)
        return TransientProviderError(f"unexpected: {exc!r}", SyncErrorCode.READ_FAILED)
    error: ProviderError
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None
        workspace = await work.session.get(Workspace, mailbox.workspace_id)
        if workspace is None:
            return None
        # On SQLite the pass's transaction holds the only write lock: a refresh during the
        # pass is stored by the pass's own writes (its commit, or `record_failure`).
        store.deferred = settings.is_sqlite
        try:
            return await sync_pass(
                work.session,
                work.effects,
                settings,
                workspace,
                mailbox,
                credentials,
                started,
                provider,
            )
        except ProviderError as exc:
            error = exc
        except Exception as exc:
            log.exception("mailbox %s: sync pass failed unexpectedly", mailbox_id)
            error = TransientProviderError(f"unexpected: {exc!r}", SyncErrorCode.READ_FAILED)
        finally:
            store.deferred = False
        work.discard()
    return error


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
