"""Filing fetched messages: decide (R1-R6, R12), store once per workspace (R7), thread (R9),
link timelines.

Mail is filed a batch at a time: one query per lookup for the whole batch and bulk inserts,
because per-message ORM round trips cost far more than parsing does. A batch that loses a
race with a concurrent pass (the unique Message-ID of R7) is filed again one message at a
time, where the loser simply records its sighting.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import ContactMatching, Workspace
from backend.contacts import queries as contact_queries
from backend.contacts import service as contacts_service
from backend.contacts.tables import Contact, ContactAddress
from backend.db import is_deadlock, table_of
from backend.exclusions.queries import excluded_values
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mail import service as mail_service
from backend.mail.service import email_received_event
from backend.mail.tables import (
    Email,
    EmailDirection,
    EmailSource,
    MailboxMessage,
    Participant,
    ParticipantRole,
    Thread,
    TimelineEntry,
)
from backend.mailboxes import queries as mailbox_queries
from backend.mailboxes.tables import Mailbox, SyncMode
from backend.providers.base import FetchedMessage
from backend.sync.filing import FilingContext, FilingDecision, decide
from backend.sync.parsing import ParsedMessage, parse_message

log = logging.getLogger(__name__)

# Runs of a batch's savepoint when PostgreSQL picks it as a deadlock's victim; beyond that
# the failure is the batch's (the pass fails and runs again later).
DEADLOCK_ATTEMPTS = 3


class Outcome(enum.Enum):
    FILED = "filed"
    DUPLICATE = "duplicate"
    SKIPPED = "skipped"


@dataclass
class IngestResult:
    outcome: Outcome
    email_id: uuid.UUID | None = None
    reason: str | None = None


async def filing_context(
    session: AsyncSession, workspace: Workspace, mailbox: Mailbox
) -> FilingContext:
    return await workspace_filing_context(session, workspace, mailbox.sync_mode)


async def workspace_filing_context(
    session: AsyncSession, workspace: Workspace, sync_mode: SyncMode = SyncMode.TWO_WAY
) -> FilingContext:
    """The rules' view of the workspace: users' addresses (R1), exclusions (R4), R5's setting."""
    excluded = set(await excluded_values(session, workspace.id))
    disabled = await session.scalars(
        select(ContactAddress.address)
        .join(Contact, col(Contact.id) == ContactAddress.contact_id)
        .where(Contact.workspace_id == workspace.id, col(Contact.email_sync_enabled).is_(False))
    )
    excluded.update(disabled)
    return FilingContext(
        own_addresses=await mailbox_queries.own_addresses(session, workspace.id),
        excluded=frozenset(excluded),
        auto_creation=workspace.contact_auto_creation,
        sync_mode=sync_mode,
    )


def synthetic_message_id(mailbox: Mailbox, provider_id: str) -> str:
    """R7 falls back to the provider id for mail without a Message-ID."""
    return f"<{provider_id}@{mailbox.provider.value.lower()}.{mailbox.id.hex}.mailsync.invalid>"


@dataclass
class _Item:
    fetched: FetchedMessage
    parsed: ParsedMessage
    message_id: str
    thread_ref: str | None
    sent_at: datetime
    result: IngestResult | None = None
    decision: FilingDecision | None = None
    contacts: list[Contact] = field(default_factory=list)


class _Batch:
    """The lookups of one batch, each one query, and the rows it will insert."""

    def __init__(self, session: AsyncSession, workspace: Workspace, mailbox: Mailbox) -> None:
        self.session = session
        self.workspace = workspace
        self.mailbox = mailbox
        self.threads_by_ref: dict[str, uuid.UUID] = {}
        self.threads_by_message_id: dict[str, uuid.UUID] = {}
        self.new_threads: dict[uuid.UUID, dict[str, Any]] = {}
        self.thread_changes: dict[uuid.UUID, list[Any]] = {}  # id -> [added, last, subject]
        self.contact_last: dict[uuid.UUID, datetime] = {}
        self.emails: list[dict[str, Any]] = []
        self.participants: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.sightings: list[dict[str, Any]] = []
        self.claimed: set[uuid.UUID] = set()

    async def existing(self, message_ids: Sequence[str]) -> dict[str, uuid.UUID]:
        rows = await self.session.execute(
            select(Email.message_id, Email.id).where(
                Email.workspace_id == self.workspace.id, col(Email.message_id).in_(message_ids)
            )
        )
        return {message_id: email_id for message_id, email_id in rows}

    async def seen(self, provider_ids: Sequence[str]) -> set[str]:
        rows = await self.session.scalars(
            select(MailboxMessage.provider_message_id).where(
                MailboxMessage.mailbox_id == self.mailbox.id,
                col(MailboxMessage.provider_message_id).in_(provider_ids),
            )
        )
        return set(rows)

    async def load_threads(self, refs: Sequence[str], related: Sequence[str]) -> None:
        """R9: the mailbox's provider threads, and the threads of the mail being replied to."""
        if refs:
            rows = await self.session.execute(
                select(MailboxMessage.provider_thread_id, Email.thread_id)
                .join(Email, col(Email.id) == MailboxMessage.email_id)
                .where(
                    MailboxMessage.mailbox_id == self.mailbox.id,
                    col(MailboxMessage.provider_thread_id).in_(refs),
                )
            )
            self.threads_by_ref.update({ref: thread for ref, thread in rows if ref})
        if related:
            rows = await self.session.execute(
                select(Email.message_id, Email.thread_id).where(
                    Email.workspace_id == self.workspace.id, col(Email.message_id).in_(related)
                )
            )
            self.threads_by_message_id.update({message_id: thread for message_id, thread in rows})

    async def crm_threads(self, thread_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        if not thread_ids:
            return set()
        rows = await self.session.scalars(
            select(Email.thread_id)
            .where(col(Email.thread_id).in_(thread_ids), Email.source == EmailSource.CRM)
            .distinct()
        )
        return set(rows)

    def thread_for(self, item: _Item) -> uuid.UUID | None:
        if item.thread_ref and item.thread_ref in self.threads_by_ref:
            return self.threads_by_ref[item.thread_ref]
        parsed = item.parsed
        for message_id in [
            *([parsed.in_reply_to] if parsed.in_reply_to else []),
            *reversed(parsed.references),
        ]:
            if message_id in self.threads_by_message_id:
                return self.threads_by_message_id[message_id]
        return None  # R9: never by subject

    def add(self, item: _Item, thread_id: uuid.UUID | None, direction: EmailDirection) -> uuid.UUID:
        parsed = item.parsed
        if thread_id is None:
            thread_id = uuid.uuid4()
            self.new_threads[thread_id] = {
                "id": thread_id,
                "workspace_id": self.workspace.id,
                "subject": parsed.subject,
                "last_email_at": item.sent_at,
                "email_count": 0,
                "created_at": now(),
            }
        if thread_id in self.new_threads:  # inserted with its final counters, no UPDATE
            new = self.new_threads[thread_id]
            new["email_count"] += 1
            new["last_email_at"] = max(new["last_email_at"], item.sent_at)
        else:
            change = self.thread_changes.setdefault(thread_id, [0, item.sent_at, parsed.subject])
            change[0] += 1
            change[1] = max(change[1], item.sent_at)
        if item.thread_ref:
            self.threads_by_ref.setdefault(item.thread_ref, thread_id)
        self.threads_by_message_id[item.message_id] = thread_id
        email_id = uuid.uuid4()
        self.emails.append(
            {
                "id": email_id,
                "workspace_id": self.workspace.id,
                "thread_id": thread_id,
                "mailbox_id": self.mailbox.id,
                "message_id": item.message_id,
                "in_reply_to": parsed.in_reply_to,
                "references": parsed.references,
                "direction": direction,
                "source": EmailSource.SYNC,
                "subject": parsed.subject,
                "snippet": parsed.snippet,
                "body_text": parsed.body_text,
                "body_html": parsed.body_html,
                "headers": parsed.headers,
                "attachments": parsed.attachments,
                "sent_at": item.sent_at,
                "sent_by_id": self.mailbox.owner_id,
                "delivery_status": None,
                "delivery_error": None,
                "idempotency_key": None,
                "created_at": now(),
            }
        )
        self.participants.extend(
            {
                "id": uuid.uuid4(),
                "email_id": email_id,
                "role": role,
                "position": i,
                "address": address,
                "name": name,
            }
            for i, (role, address, name) in enumerate(_participants(parsed))
        )
        for contact in item.contacts:
            self.timeline.append(
                {
                    "email_id": email_id,
                    "contact_id": contact.id,
                    "workspace_id": self.workspace.id,
                    "sent_at": item.sent_at,
                    "filed_at": now(),
                }
            )
            if contact.id not in self.contact_last or self.contact_last[contact.id] < item.sent_at:
                self.contact_last[contact.id] = item.sent_at
        self.sight(item, email_id)
        return email_id

    def sight(self, item: _Item, email_id: uuid.UUID) -> None:
        self.sightings.append(
            {
                "id": uuid.uuid4(),
                "mailbox_id": self.mailbox.id,
                "email_id": email_id,
                "provider_message_id": item.fetched.ref.provider_id,
                "provider_thread_id": item.thread_ref,
                "seen_at": now(),
            }
        )

    def claim(self, email_id: uuid.UUID) -> None:
        """The sender's own copy: the email is theirs, whoever's mailbox synced it first."""
        self.claimed.add(email_id)

    async def write(self) -> None:
        s = self.session
        if self.new_threads:
            await s.execute(sa.insert(table_of(Thread)), list(self.new_threads.values()))
        if self.emails:
            await s.execute(sa.insert(table_of(Email)), self.emails)
        if self.participants:
            await s.execute(sa.insert(table_of(Participant)), self.participants)
        if self.timeline:
            # Each entry's trigger row-locks its contact (timeline_count) until commit: every
            # batch takes those locks in contact order, so two batches never wait on each
            # other in a cycle (PostgreSQL would abort one as a deadlock).
            rows = sorted(self.timeline, key=lambda r: (r["contact_id"], r["email_id"]))
            await s.execute(sa.insert(table_of(TimelineEntry)), rows)
        if self.sightings:
            await s.execute(sa.insert(table_of(MailboxMessage)), self.sightings)
        if self.claimed:
            emails = table_of(Email)
            await s.execute(
                sa.update(emails)
                .where(
                    emails.c.id.in_(self.claimed),
                    sa.or_(emails.c.mailbox_id.is_(None), emails.c.mailbox_id != self.mailbox.id),
                )
                .values(mailbox_id=self.mailbox.id, sent_by_id=self.mailbox.owner_id)
            )
        # Core statements: the ORM's session synchronisation of an UPDATE costs more than
        # the UPDATE itself here, and no loaded object depends on these columns.
        threads = table_of(Thread)
        if self.thread_changes:
            last = sa.bindparam("last_at", type_=threads.c.last_email_at.type)
            await s.execute(
                sa.update(threads)
                .where(threads.c.id == sa.bindparam("thread_id"))
                .values(
                    email_count=threads.c.email_count + sa.bindparam("added"),
                    last_email_at=sa.case(
                        (threads.c.last_email_at < last, last), else_=threads.c.last_email_at
                    ),
                    subject=sa.func.coalesce(threads.c.subject, sa.bindparam("new_subject")),
                ),
                [  # in id order, as the contacts: a fixed lock order
                    {"thread_id": t, "added": added, "last_at": at, "new_subject": subject}
                    for t, (added, at, subject) in sorted(self.thread_changes.items())
                ],
            )
        contacts = table_of(Contact)
        if self.contact_last:
            last = sa.bindparam("last_at", type_=contacts.c.last_email_at.type)
            await s.execute(
                sa.update(contacts)
                .where(
                    contacts.c.id == sa.bindparam("contact_id"),
                    sa.or_(contacts.c.last_email_at.is_(None), contacts.c.last_email_at < last),
                )
                .values(last_email_at=last),
                [{"contact_id": c, "last_at": at} for c, at in sorted(self.contact_last.items())],
            )


def _participants(parsed: ParsedMessage) -> list[tuple[ParticipantRole, str, str | None]]:
    out: list[tuple[ParticipantRole, str, str | None]] = []
    if parsed.sender:
        out.append((ParticipantRole.FROM, parsed.sender.address, parsed.sender.name))
    for role, group in (
        (ParticipantRole.TO, parsed.to),
        (ParticipantRole.CC, parsed.cc),
        (ParticipantRole.BCC, parsed.bcc),
    ):
        out.extend((role, p.address, p.name) for p in group)
    return out


async def ingest_batch(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    messages: Sequence[tuple[FetchedMessage, ParsedMessage]],
) -> list[IngestResult]:
    """File parsed messages; results come back in order. Raises only for storage failures
    (a deadlock that persists included: `db.is_deadlock`, a failure to retry the batch)."""
    try:
        return await _in_savepoint(session, effects, workspace, mailbox, ctx, messages)
    except IntegrityError:
        pass
    # A concurrent pass stored some of these first (R7): go one by one. Once the other pass
    # has committed, the loser finds the email and only records where it saw it.
    results: list[IngestResult] = []
    for message in messages:
        for attempt in range(2):
            try:
                results.extend(
                    await _in_savepoint(session, effects, workspace, mailbox, ctx, [message])
                )
                break
            except IntegrityError:
                if attempt:
                    raise
    return results


async def _in_savepoint(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    messages: Sequence[tuple[FetchedMessage, ParsedMessage]],
) -> list[IngestResult]:
    """`_ingest_batch` in a savepoint, run again when PostgreSQL aborted it as a deadlock's
    victim: rolling back to the savepoint releases its locks, so the other transaction goes
    on and the retry waits for it instead of failing the pass."""
    attempt = 1
    while True:
        try:
            async with session.begin_nested():
                return await _ingest_batch(session, effects, workspace, mailbox, ctx, messages)
        except DBAPIError as exc:
            if attempt >= DEADLOCK_ATTEMPTS or not is_deadlock(exc):
                raise
            attempt += 1
            log.info("mailbox %s: a batch was a deadlock's victim; running it again", mailbox.id)


async def _ingest_batch(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    messages: Sequence[tuple[FetchedMessage, ParsedMessage]],
) -> list[IngestResult]:
    items = [
        _Item(
            fetched=fetched,
            parsed=parsed,
            message_id=parsed.message_id or synthetic_message_id(mailbox, fetched.ref.provider_id),
            thread_ref=fetched.thread_id or fetched.ref.thread_id,
            sent_at=parsed.date or fetched.internal_date or now(),
        )
        for fetched, parsed in messages
    ]
    batch = _Batch(session, workspace, mailbox)
    known = await batch.existing([i.message_id for i in items])
    deleted = await mail_service.deleted_among(session, workspace.id, [i.message_id for i in items])
    already_seen = await batch.seen(
        [i.fetched.ref.provider_id for i in items if i.message_id in known]
    )
    pending: list[_Item] = []
    for item in items:
        if item.message_id in known:
            # R7: seen before (another mailbox, a replay, a crash before commit): never twice.
            if item.fetched.ref.provider_id not in already_seen:
                batch.sight(item, known[item.message_id])
                already_seen.add(item.fetched.ref.provider_id)
                sender = item.parsed.sender
                if sender and ctx.own_addresses.get(sender.address) == mailbox.owner_id:
                    batch.claim(known[item.message_id])  # R8
            item.result = IngestResult(Outcome.DUPLICATE, known[item.message_id])
        elif item.message_id in deleted:
            # R11: deleted from the CRM; no mailbox brings it back (a re-list, another copy).
            item.result = IngestResult(Outcome.SKIPPED, reason="deleted from the CRM")
        # Date headers carry whole seconds: mail of the connection's own second counts as after.
        elif item.sent_at < mailbox.connected_at.replace(microsecond=0):
            item.result = IngestResult(Outcome.SKIPPED, reason="dated before the connection")  # R6
        else:
            item.decision = decide(item.parsed, ctx)
            if item.decision.skip_reason is not None:
                item.result = IngestResult(Outcome.SKIPPED, reason=item.decision.skip_reason)
            else:
                pending.append(item)
    matched = await contact_queries.contacts_for_addresses(
        session,
        workspace.id,
        sorted({a for i in pending for a in i.decision.candidates}),  # type: ignore[union-attr]
        primary_only=workspace.contact_matching == ContactMatching.PRIMARY_EMAIL_ONLY,
    )
    # R5 decides per address: an address is created only when no contact has it at all.
    taken = await contact_queries.known_addresses(
        session,
        workspace.id,
        sorted({p.address for i in pending for p in i.decision.creatable}),  # type: ignore[union-attr]
    )
    await batch.load_threads(
        sorted({i.thread_ref for i in pending if i.thread_ref}),
        sorted({m for i in pending for m in [*i.parsed.references, i.parsed.in_reply_to] if m}),
    )
    crm_threads = (
        await batch.crm_threads(list({t for i in pending if (t := batch.thread_for(i))}))
        if ctx.sync_mode == SyncMode.CRM_THREADS_ONLY
        else set()
    )
    filed: list[tuple[uuid.UUID, _Item]] = []
    in_batch: dict[str, uuid.UUID] = {}
    for item in pending:
        assert item.decision is not None
        if item.message_id in in_batch:  # the same message twice in one batch
            batch.sight(item, in_batch[item.message_id])
            item.result = IngestResult(Outcome.DUPLICATE, in_batch[item.message_id])
            continue
        for address in item.decision.candidates:
            contact = matched.get(address)
            if contact is not None and contact not in item.contacts:
                item.contacts.append(contact)
        creatable = [
            p
            for p in item.decision.creatable
            if p.address not in matched and p.address not in taken
        ]
        if creatable:
            created = await contacts_service.create_auto_contacts(session, workspace.id, creatable)
            matched.update({p.address: c for p, c in zip(creatable, created, strict=True)})
            item.contacts.extend(created)
        if not item.contacts:
            item.result = IngestResult(
                Outcome.SKIPPED, reason="no contact"
            )  # R5: not stored at all
            continue
        thread_id = batch.thread_for(item)
        if ctx.sync_mode == SyncMode.CRM_THREADS_ONLY and thread_id not in crm_threads:
            item.result = IngestResult(Outcome.SKIPPED, reason="not a CRM thread")  # R12
            continue
        email_id = batch.add(item, thread_id, item.decision.direction)
        in_batch[item.message_id] = email_id
        item.result = IngestResult(Outcome.FILED, email_id)
        filed.append((email_id, item))
    await batch.write()
    for email_id, item in filed:
        thread_id = batch.threads_by_message_id[item.message_id]
        effects.publish(
            workspace.id,
            email_received_event(email_id, thread_id, mailbox.id, [c.id for c in item.contacts]),
        )
    return [i.result for i in items if i.result is not None]


async def ingest(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    mailbox: Mailbox,
    ctx: FilingContext,
    fetched: FetchedMessage,
    parsed: ParsedMessage | None = None,
) -> IngestResult:
    """File one message: a batch of one."""
    parsed = parsed or parse_message(fetched.raw)
    (result,) = await ingest_batch(session, effects, workspace, mailbox, ctx, [(fetched, parsed)])
    return result
