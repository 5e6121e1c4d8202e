"""R16: mail Bcc'd or forwarded to a workspace's capture address, filed as synced mail is
(R1-R5, R7, R9, R11), with source CAPTURE. Mail that matches no contact is stored anyway and
waits in the unassigned list. Services flush; the caller's unit of work commits."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import Workspace
from backend.capture.forwards import original_of, synthetic_message_id
from backend.contacts import service as contacts_service
from backend.contacts.tables import Contact
from backend.kit.addresses import normalize_address
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mail import service as mail_service
from backend.mail.service import NewEmail, ParticipantData, email_received_event
from backend.mail.tables import Email, EmailSource, ParticipantRole, Thread
from backend.sync.filing import FilingDecision, decide
from backend.sync.ingest import workspace_filing_context
from backend.sync.parsing import ParsedAddress, ParsedMessage, UnparseableMessage, parse_message
from backend.timeline.service import store_email

UNASSIGNED_EVENT = "unassignedEmailReceived"


class CaptureRefused(Exception):
    """The message is refused for good (the sending server must not retry it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CaptureStatus(enum.StrEnum):
    FILED = "filed"  # on at least one contact's timeline
    UNASSIGNED = "unassigned"  # stored, waiting in the unassigned list
    DUPLICATE = "duplicate"  # stored before (R7)
    SKIPPED = "skipped"  # accepted, not stored (R4 exclusions, R11 deleted, internal mail)


@dataclass
class CaptureResult:
    status: CaptureStatus
    email_id: uuid.UUID | None = None
    reason: str | None = None


def capture_key_of(address: str, capture_domain: str) -> str | None:
    """The workspace key in a capture address, or None for any other address."""
    local, sep, domain = normalize_address(address).rpartition("@")
    if not sep or not local or domain != normalize_address(f"x@{capture_domain}").split("@")[1]:
        return None
    return local


async def workspace_for_address(
    session: AsyncSession, address: str, capture_domain: str
) -> Workspace | None:
    key = capture_key_of(address, capture_domain)
    if key is None:
        return None
    found = await session.scalars(select(Workspace).where(Workspace.capture_key == key))
    return found.first()


def _without(group: Sequence[ParsedAddress], capture_domain: str) -> list[ParsedAddress]:
    return [p for p in group if capture_key_of(p.address, capture_domain) is None]


def _participants(parsed: ParsedMessage) -> list[ParticipantData]:
    return [
        ParticipantData(role=role, address=p.address, name=p.name)
        for role, group in (
            (ParticipantRole.FROM, [parsed.sender] if parsed.sender else []),
            (ParticipantRole.TO, parsed.to),
            (ParticipantRole.CC, parsed.cc),
            (ParticipantRole.BCC, parsed.bcc),
        )
        for p in group
    ]


async def _thread_for(
    session: AsyncSession, workspace: Workspace, parsed: ParsedMessage
) -> Thread | None:
    """R9: the thread of the mail it replies to; never by subject."""
    related = [*([parsed.in_reply_to] if parsed.in_reply_to else []), *reversed(parsed.references)]
    if not related:
        return None
    rows = await session.execute(
        select(Email.message_id, Email.thread_id).where(
            Email.workspace_id == workspace.id, col(Email.message_id).in_(related)
        )
    )
    by_message = {message_id: thread_id for message_id, thread_id in rows}
    for message_id in related:
        if message_id in by_message:
            return await session.get(Thread, by_message[message_id])
    return None


async def _existing(session: AsyncSession, workspace: Workspace, message_id: str) -> Email | None:
    found = await session.scalars(
        select(Email).where(Email.workspace_id == workspace.id, Email.message_id == message_id)
    )
    return found.first()


async def capture_message(
    session: AsyncSession,
    effects: AfterCommit,
    workspace: Workspace,
    raw: bytes,
    capture_domain: str,
) -> CaptureResult:
    """File one captured message. Raises CaptureRefused when it must not be filed at all."""
    try:
        outer = parse_message(raw)
    except UnparseableMessage as exc:
        raise CaptureRefused(f"not a message: {exc}") from exc
    ctx = await workspace_filing_context(session, workspace)
    sender = outer.sender
    user_id = ctx.own_addresses.get(sender.address) if sender else None
    if user_id is None:
        # Only the workspace's users may file through the address, so that it cannot be
        # used to inject mail into the CRM.
        raise CaptureRefused("the sender is not a user of this workspace")
    original = original_of(raw, outer) or outer  # a forward's original, or the Bcc'd message
    original = replace(
        original,
        to=_without(original.to, capture_domain),
        cc=_without(original.cc, capture_domain),
        bcc=_without(original.bcc, capture_domain),
    )
    message_id = original.message_id or synthetic_message_id(original)
    existing = await _existing(session, workspace, message_id)
    if existing is not None:
        return CaptureResult(CaptureStatus.DUPLICATE, existing.id)  # R7
    if await mail_service.deleted_among(session, workspace.id, [message_id]):
        return CaptureResult(CaptureStatus.SKIPPED, reason="deleted from the CRM")  # R11
    decision = decide(original, ctx, source=EmailSource.CAPTURE)
    if decision.skip_reason is not None:
        return CaptureResult(CaptureStatus.SKIPPED, reason=decision.skip_reason)
    try:
        async with session.begin_nested():
            email, contacts = await _store(
                session, workspace, original, message_id, user_id, decision
            )
    except IntegrityError:
        # The same message captured concurrently (or synced meanwhile): stored once (R7).
        existing = await _existing(session, workspace, message_id)
        if existing is None:
            raise
        return CaptureResult(CaptureStatus.DUPLICATE, existing.id)
    event = email_received_event(email.id, email.thread_id, None, [c.id for c in contacts])
    if contacts:
        effects.publish(workspace.id, event)
        return CaptureResult(CaptureStatus.FILED, email.id)
    effects.publish(workspace.id, {**event, "type": UNASSIGNED_EVENT})
    return CaptureResult(CaptureStatus.UNASSIGNED, email.id)


async def _store(
    session: AsyncSession,
    workspace: Workspace,
    parsed: ParsedMessage,
    message_id: str,
    user_id: uuid.UUID,
    decision: FilingDecision,
) -> tuple[Email, list[Contact]]:
    contacts = await contacts_service.contacts_to_file_on(
        session, workspace, decision.candidates, decision.creatable
    )
    sent_at = parsed.date or now()
    thread = await _thread_for(session, workspace, parsed)
    if thread is None:
        thread = Thread(workspace_id=workspace.id, subject=parsed.subject, last_email_at=sent_at)
        session.add(thread)
        await session.flush()
    data = NewEmail(
        message_id=message_id,
        direction=decision.direction,
        sent_at=sent_at,
        participants=_participants(parsed),
        source=EmailSource.CAPTURE,
        subject=parsed.subject,
        snippet=parsed.snippet,
        body_text=parsed.body_text,
        body_html=parsed.body_html,
        in_reply_to=parsed.in_reply_to,
        references=parsed.references,
        headers=parsed.headers,
        attachments=parsed.attachments,
        sent_by_id=user_id,
    )
    email = await store_email(
        session,
        workspace_id=workspace.id,
        thread=thread,
        mailbox_id=None,
        data=data,
        contacts=contacts,
    )
    return email, contacts
