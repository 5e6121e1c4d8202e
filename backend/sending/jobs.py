"""The send job (`send:<email id>`): it takes an id, reloads the rows, and is safe to run
twice. R15's "never twice": the attempt is counted (and committed) before the provider is
called, so a retry after a crash first looks for the message in the mailbox."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from arq import Retry
from sqlmodel import col, select

from backend.kit.clock import as_utc, now
from backend.kit.crypto import encrypt_json
from backend.mail.tables import DeliveryStatus, Email
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import (
    PermanentProviderError,
    ProviderError,
    SentMessage,
    TransientProviderError,
)
from backend.providers.imap.provider import ImapProvider
from backend.sending.service import record_failed, record_sent
from backend.sending.tables import OutgoingMessage
from backend.sync.credentials import MailboxCredentialStore
from backend.sync.service import provider_for_mailbox

if TYPE_CHECKING:
    from backend.runtime import Runtime

log = logging.getLogger(__name__)

# Transient failures (rate limits, 5xx) are retried with backoff this many times in all.
MAX_SEND_ATTEMPTS = 5
MAX_SEND_BACKOFF_SECONDS = 300


def send_backoff(attempt: int, retry_after: float | None) -> float:
    """2, 4, 8, 16 s...: a user waits for this mail; never sooner than the provider asks."""
    return max(min(2.0**attempt, MAX_SEND_BACKOFF_SECONDS), retry_after or 0.0)


CANNOT_SEND = {MailboxStatus.DISCONNECTED, MailboxStatus.SUSPENDED}


@dataclass
class _Send:
    raw: bytes
    message_id: str
    provider_thread_id: str | None
    attempt: int
    # Earlier attempts may have reached the provider: look before sending (R15).
    look_first: bool
    # Attempts are used up: look, and fail the email if the mail is not there.
    last_look: bool
    # An SMTP server accepted it on an earlier attempt: only the Sent copy is left to make.
    smtp_accepted: bool = False


async def _claim(runtime: Runtime, row_id: uuid.UUID) -> tuple[_Send, Mailbox] | str:
    """Count the attempt and commit it before the provider is called; or settle what cannot
    be sent. A string is the job's result."""
    settings = runtime.settings
    async with runtime.unit_of_work() as work:
        email = await work.session.get(Email, row_id)
        outgoing = await work.session.get(OutgoingMessage, row_id)
        if email is None or outgoing is None or email.delivery_status != DeliveryStatus.QUEUED:
            return "settled"  # sent, failed or deleted meanwhile: a replayed job does nothing
        mailbox = await work.session.get(Mailbox, outgoing.mailbox_id)
        if mailbox is None or mailbox.status in CANNOT_SEND:
            if mailbox is not None:
                reason = PermanentProviderError(f"the mailbox is {mailbox.status.value.lower()}")
                await record_failed(work.session, work.effects, email, mailbox, reason)
            return "failed"
        if outgoing.last_attempt_at is not None:
            # A provider may take a while to file what it accepted (Graph's sendMail answers
            # before the Sent copy exists): never look for it, let alone resend, too early.
            ready = as_utc(outgoing.last_attempt_at) + timedelta(
                seconds=settings.send_confirm_seconds
            )
            wait = (ready - now()).total_seconds()
            if wait > 0:
                raise Retry(defer=wait)
        outgoing.attempts += 1
        outgoing.last_attempt_at = now()
        work.session.add(outgoing)
        return _Send(
            raw=outgoing.raw,
            message_id=email.message_id,
            provider_thread_id=outgoing.provider_thread_id,
            attempt=outgoing.attempts,
            look_first=outgoing.attempts > 1,
            last_look=outgoing.attempts > MAX_SEND_ATTEMPTS,
            smtp_accepted=outgoing.smtp_accepted_at is not None,
        ), mailbox


async def send_email(runtime: Runtime, email_id: str) -> str:
    try:
        row_id = uuid.UUID(email_id)
    except ValueError:
        log.warning("ignoring a send job for a malformed email id %r", email_id)
        return "malformed"
    settings = runtime.settings
    claimed = await _claim(runtime, row_id)
    if isinstance(claimed, str):
        return claimed
    send, mailbox = claimed
    outcome: SentMessage | ProviderError | None = None
    provider = provider_for_mailbox(settings, mailbox)
    # No transaction is open during the calls: a rotated token is stored at once.
    store = MailboxCredentialStore(runtime.unit_of_work, settings.secret, mailbox.id)
    provider.credential_store = store
    if isinstance(provider, ImapProvider):
        provider.on_accepted = lambda: _record_smtp_accepted(runtime, row_id)
    try:
        if send.smtp_accepted and isinstance(provider, ImapProvider):
            log.info("email %s: SMTP accepted it before; only its Sent copy is filed", email_id)
            try:
                outcome = await provider.file_accepted(send.raw, send.message_id)
            except ProviderError as exc:
                # It is sent: no Sent copy (sync will not see it) rather than a failure.
                log.warning("email %s: no Sent copy: %s", email_id, exc)
                outcome = SentMessage("")
        elif send.look_first:
            outcome = await provider.find_sent(send.message_id)
            if outcome is not None:
                log.info("email %s: the provider had it already; not sent again", email_id)
        if outcome is None and not send.last_look:
            outcome = await provider.send(send.raw, send.provider_thread_id)
    except ProviderError as exc:
        outcome = exc
    except Exception as exc:
        # A bug or an unreadable answer: the provider may or may not have the mail, so it
        # counts as an attempt and the next one looks first.
        log.exception("email %s: send attempt %d failed unexpectedly", email_id, send.attempt)
        outcome = TransientProviderError(f"unexpected: {exc!r}")
    finally:
        # What the store saved is not written again: another process may have rotated it.
        refreshed = None if store.stored else provider.updated_credentials()
        await provider.close()
    async with runtime.unit_of_work() as work:
        email = await work.session.get(Email, row_id)
        mailbox_row = await work.session.get(Mailbox, mailbox.id)
        if email is None or mailbox_row is None:
            return "deleted"
        if refreshed is not None:
            # Only over the credentials it was sent with: a reconnect meanwhile wrote others.
            await work.session.execute(
                sa.update(Mailbox)
                .where(
                    col(Mailbox.id) == mailbox.id,
                    col(Mailbox.credentials_encrypted) == mailbox.credentials_encrypted,
                )
                .values(credentials_encrypted=encrypt_json(settings.secret, refreshed))
            )
        if isinstance(outcome, SentMessage):
            await record_sent(work.session, work.effects, email, mailbox_row, outcome)
            return "sent"
        if outcome is None:
            outcome = PermanentProviderError(
                f"not sent after {MAX_SEND_ATTEMPTS} attempts, and not in the mailbox"
            )
        if not isinstance(outcome, TransientProviderError) or send.last_look:
            await record_failed(work.session, work.effects, email, mailbox_row, outcome)
            return "failed"
        delay = send_backoff(send.attempt, outcome.retry_after)
        log.info("email %s: send attempt %d failed, retrying: %s", email_id, send.attempt, outcome)
    # The refreshed credentials are committed; arq runs the job again after the backoff.
    raise Retry(defer=delay)


async def _record_smtp_accepted(runtime: Runtime, row_id: uuid.UUID) -> None:
    """Committed on its own, before the APPEND: a crash after this never sends again."""
    try:
        async with runtime.unit_of_work() as work:
            outgoing = await work.session.get(OutgoingMessage, row_id)
            if outgoing is not None:
                outgoing.smtp_accepted_at = now()
                work.session.add(outgoing)
    except Exception:
        # The message is sent whatever happens here; a retry falls back to looking in Sent.
        log.exception("email %s: could not record that SMTP accepted it", row_id)


async def requeue_unsent(runtime: Runtime) -> int:
    """Nothing is lost: a queued email whose job vanished (Redis lost, say) is queued again.
    The job id makes this a no-op for an email whose job is still queued or running."""
    horizon = now() - timedelta(seconds=2 * runtime.settings.send_timeout_seconds)
    async with runtime.unit_of_work() as work:
        waiting = list(
            await work.session.scalars(
                select(OutgoingMessage.email_id).where(col(OutgoingMessage.created_at) < horizon)
            )
        )
    for email_id in waiting:
        await runtime.jobs.enqueue_send(str(email_id))
    return len(waiting)
