"""Worker jobs of the sync domain. They take ids, reload rows and are safe to run twice."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from backend.kit.clock import now
from backend.mailboxes.service import note_provider_issue
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import (
    MailProvider,
    MessageRef,
    ProviderConfigurationError,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.sync import service
from backend.sync.credentials import MailboxCredentialStore, UnitOfWork
from backend.sync.queue import SyncQueue
from backend.sync.service import (
    FETCH_BATCH,
    SYNCABLE,
    PassCredentials,
    PassResult,
    PassStart,
    Progress,
    batches_of,
    due_mailboxes,
    fetch_and_parse,
    record_failure,
)

if TYPE_CHECKING:
    from backend.runtime import Runtime, Work
    from backend.settings import Settings

log = logging.getLogger(__name__)


async def sync_mailbox(runtime: Runtime, mailbox_id: str) -> PassResult | None:
    try:
        row_id = uuid.UUID(mailbox_id)
    except ValueError:
        log.warning("ignoring a sync job for a malformed mailbox id %r", mailbox_id)
        return None
    return await run_pass(runtime, row_id)


async def run_pass(runtime: Runtime, mailbox_id: uuid.UUID) -> PassResult | None:
    """One pass. No transaction is open while the provider is called: the pass reads in one
    statement, then talks to the provider, and writes each batch (with what it moves, see
    `sync/service`) in a short transaction of its own; a failure is recorded in another. The
    job's id guarantees one pass per mailbox at a time (R14). A failure to record the failure
    fails the job instead, and arq retries it."""
    started = now()
    settings = runtime.settings
    async with runtime.unit_of_work(read_only=True) as work:
        # Committed, not discarded: a rollback would expire the rows the pass goes on using.
        start = await service.load_pass(work.session, mailbox_id)
    if start is None:
        return None
    if start.mailbox.status == MailboxStatus.DISCONNECTED:
        await service.stop_pushes(settings, start.mailbox)
        async with runtime.unit_of_work() as work:
            await service.forget_provider_side(work.session, start.mailbox)
        return None
    if start.mailbox.status not in SYNCABLE:
        return None
    credentials = PassCredentials(sealed=start.mailbox.credentials_encrypted)
    progress = Progress()
    try:
        provider = service.provider_for_mailbox(settings, start.mailbox)
    except ProviderError as exc:
        error: ProviderError = exc
    else:
        limit = settings.sync_pass_timeout_seconds
        try:
            # Our own limit, inside arq's (PASS_GRACE longer): a pass that overruns it keeps
            # the batches it filed, and is recorded like any failure (with its backoff, hence
            # a retry) instead of vanishing as a cancelled job.
            async with asyncio.timeout(limit):
                outcome = await _pass(runtime, start, provider, credentials, progress, started)
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
        # For update: the reconnect check of `record_failure` holds until this commits.
        mailbox = await work.session.get(Mailbox, mailbox_id, with_for_update=True)
        if mailbox is None or mailbox.status not in SYNCABLE:
            return None  # disconnected (or gone) meanwhile: its failure is nobody's concern
        if isinstance(error, ProviderConfigurationError):
            await note_provider_issue(work.session, mailbox.provider, error)
        return record_failure(
            work.session, work.effects, settings, mailbox, error, credentials, started, progress
        )


async def _pass(
    runtime: Runtime,
    start: PassStart,
    provider: MailProvider,
    credentials: PassCredentials,
    progress: Progress,
    started: datetime,
) -> PassResult | ProviderError | None:
    """The pass itself; its failure is returned, for `run_pass` to record."""
    mailbox = start.mailbox
    # What the provider refreshes is stored at once, in a transaction of its own: the pass
    # holds none while it talks to the provider.
    provider.credential_store = PassCredentialStore(
        runtime.unit_of_work, runtime.settings.secret, mailbox.id, credentials
    )
    try:
        return await _list_and_file(runtime, start, provider, credentials, progress, started)
    except ProviderError as exc:
        return exc
    except Exception as exc:
        log.exception("mailbox %s: sync pass failed unexpectedly", mailbox.id)
        return TransientProviderError(f"unexpected: {exc!r}", SyncErrorCode.READ_FAILED)
    finally:
        credentials.refreshed = unsaved_credentials(provider)


class PassCredentialStore(MailboxCredentialStore):
    """The pass's credential store: what it stores is what the pass's later writes expect
    to find in the row (`PassCredentials.sealed`), so they tell its own rotation from a
    reconnect."""

    def __init__(
        self,
        unit_of_work: UnitOfWork,
        secret: bytes,
        mailbox_id: uuid.UUID,
        credentials: PassCredentials,
    ) -> None:
        super().__init__(unit_of_work, secret, mailbox_id)
        self.credentials = credentials

    async def save(self, credentials: dict[str, Any]) -> None:
        stored = self.stored
        await super().save(credentials)
        if self.stored > stored:
            self.credentials.sealed = self.last_sealed


def unsaved_credentials(provider: MailProvider) -> dict[str, Any] | None:
    """What the provider refreshed that its credential store did not save; once the store
    saved the provider's credentials, writing them again could replace a token another
    process rotated since."""
    store = provider.credential_store
    if isinstance(store, MailboxCredentialStore) and store.stored:
        return None
    return provider.updated_credentials()


async def _list_and_file(
    runtime: Runtime,
    start: PassStart,
    provider: MailProvider,
    credentials: PassCredentials,
    progress: Progress,
    started: datetime,
) -> PassResult | None:
    settings = runtime.settings
    mailbox, workspace = start.mailbox, start.workspace
    await provider.prepare(settings.sync_pass_timeout_seconds)
    changes = await service.list_changes(provider, mailbox)
    await service.renew_push(provider, mailbox, runtime.unit_of_work)
    refs: Sequence[MessageRef] = changes.refs
    positions: list[int] | None = None
    cursor: dict[str, Any] | None = changes.cursor
    if start.backlog or len(refs) > FETCH_BATCH:
        async with runtime.unit_of_work() as work:
            backlog = await service.save_backlog(work.session, mailbox, changes, credentials.sealed)
        if backlog is None:
            return None  # disconnected or reconnected meanwhile
        positions = [position for position, _ in backlog]
        refs = [ref for _, ref in backlog]
        cursor = None  # saved with the backlog
    batches = batches_of(refs)
    result: PassResult | None = None
    # The next batch is fetched and parsed while this one is stored: parsing is the CPU cost
    # of a pass and storing mostly waits on the database, so the two overlap.
    processes = settings.parse_processes
    upcoming = (
        asyncio.ensure_future(fetch_and_parse(provider, batches[0], processes)) if batches else None
    )
    try:
        for index in range(len(batches)):
            assert upcoming is not None
            prepared = await upcoming
            last = index + 1 == len(batches)
            upcoming = (
                None
                if last
                else asyncio.ensure_future(fetch_and_parse(provider, batches[index + 1], processes))
            )
            through = (
                None
                if positions is None
                else positions[min(len(positions), (index + 1) * FETCH_BATCH) - 1]
            )
            async with runtime.unit_of_work() as work:
                rules = await service.filing_rules(work.session, mailbox)
                if rules is None:
                    return None  # deleted meanwhile
                workspace, ctx = rules
                await service.file_batch(
                    work.session, work.effects, workspace, mailbox, ctx, prepared, progress, through
                )
                if last:
                    # The last batch moves the cursor (and the status) with the mail it files.
                    result = await _finish(
                        work, settings, mailbox, cursor, credentials, provider, progress, started
                    )
    finally:
        if upcoming is not None and not upcoming.done():
            upcoming.cancel()
    if not batches:
        async with runtime.unit_of_work() as work:
            result = await _finish(
                work, settings, mailbox, cursor, credentials, provider, progress, started
            )
    if result is not None:
        await service.label_synced(provider, workspace, mailbox, progress.on_timeline)
    return result


async def _finish(
    work: Work,
    settings: Settings,
    mailbox: Mailbox,
    cursor: dict[str, Any] | None,
    credentials: PassCredentials,
    provider: MailProvider,
    progress: Progress,
    started: datetime,
) -> PassResult | None:
    credentials.refreshed = unsaved_credentials(provider)
    result = await service.finish_pass(
        work.session, work.effects, settings, mailbox, cursor, credentials, progress, started
    )
    if result is None:
        work.discard()  # disconnected or reconnected meanwhile: nothing of this batch stays
    return result


async def after_sync(runtime: Runtime, mailbox_id: str) -> None:
    """A sync requested while this pass ran earns exactly one more pass (R14)."""
    await SyncQueue(runtime.redis).after_pass(mailbox_id)


async def schedule_due(runtime: Runtime) -> int:
    async with runtime.unit_of_work(read_only=True) as work:
        due = await due_mailboxes(work.session, runtime.settings.sync_interval_seconds)
    spread = runtime.settings.sync_spread_seconds
    for mailbox_id in due:
        # Spread the minute's passes instead of starting them all at once; the offset is
        # stable per mailbox, so each keeps its own rhythm.
        await runtime.jobs.enqueue_sync(
            str(mailbox_id), defer_seconds=mailbox_id.int % spread if spread else 0
        )
    return len(due)
