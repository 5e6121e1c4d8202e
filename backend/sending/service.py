"""R15: an email written in the CRM is filed at once (QUEUED), then sent by a job; the job's
outcome (SENT or FAILED) is recorded here. Services flush; the caller's unit of work commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from backend.auth.tables import User, Workspace
from backend.contacts import service as contacts_service
from backend.contacts.tables import Contact
from backend.kit.addresses import validate_address
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, NotFound, ServiceError, ServiceErrors
from backend.kit.text import unstorable
from backend.mail.service import NewEmail, ParticipantData, email_received_event
from backend.mail.tables import (
    DeliveryStatus,
    Email,
    EmailDirection,
    EmailSource,
    MailboxMessage,
    ParticipantRole,
    Thread,
    TimelineEntry,
)
from backend.mailboxes import access as mailbox_access
from backend.mailboxes import queries as mailbox_queries
from backend.mailboxes.tables import Mailbox, MailboxStatus, SyncErrorEntry, SyncMode
from backend.providers.base import (
    MailProvider,
    Provider,
    ProviderError,
    SendLimits,
    SendRejected,
    SendRejection,
    SentMessage,
    SyncErrorCode,
)
from backend.providers.registry import factory_for
from backend.sending.compose import Draft, compose, new_message_id
from backend.sending.tables import OutgoingMessage
from backend.sync.filing import FilingContext, decide
from backend.sync.parsing import ParsedMessage, parse_message
from backend.sync.service import record_error
from backend.timeline.access import Access, access_for
from backend.timeline.service import store_email

if TYPE_CHECKING:
    from backend.auth.service import Viewer

MAX_SUBJECT_CHARS = 998
MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_KEY_CHARS = 200
# A mailbox in ERROR for one of these cannot send until the user reconnects it.
REVOKED = {SyncErrorCode.ACCESS_REVOKED, SyncErrorCode.ACCESS_DENIED}

REJECTION_CODES = {
    SendRejection.DAILY_LIMIT: ErrorCode.SEND_LIMIT_REACHED,
    SendRejection.TOO_MANY_RECIPIENTS: ErrorCode.TOO_MANY_RECIPIENTS,
    SendRejection.TOO_LARGE: ErrorCode.MESSAGE_TOO_LARGE,
    SendRejection.RECIPIENT_REJECTED: ErrorCode.RECIPIENT_REJECTED,
    SendRejection.OTHER: ErrorCode.SEND_FAILED,
}


@dataclass
class SendRequest:
    mailbox_id: uuid.UUID | None
    to: Sequence[str]
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    subject: str = ""
    body_text: str | None = None
    body_html: str | None = None
    in_reply_to_email_id: uuid.UUID | None = None
    idempotency_key: str | None = None


def delivery_event(email: Email, contact_ids: Sequence[uuid.UUID]) -> dict[str, Any]:
    return {
        **email_received_event(email.id, email.thread_id, email.mailbox_id, contact_ids),
        "type": "emailDeliveryChanged",
        "deliveryStatus": email.delivery_status.value if email.delivery_status else None,
    }


def limits_for(provider: Provider) -> SendLimits:
    # A factory is normally the provider's class; any other callable gets the interface's
    # conservative default.
    limits = getattr(factory_for(provider), "send_limits", MailProvider.send_limits)
    return limits if isinstance(limits, SendLimits) else MailProvider.send_limits


async def _earlier_send(session: AsyncSession, viewer: Viewer, key: str | None) -> Email | None:
    if key is None:
        return None
    found = await session.scalars(
        select(Email).where(
            Email.workspace_id == viewer.workspace_id,
            Email.sent_by_id == viewer.user.id,
            Email.idempotency_key == key,
        )
    )
    return found.first()


async def _sending_mailbox(
    session: AsyncSession, viewer: Viewer, mailbox_id: uuid.UUID | None
) -> Mailbox:
    mailbox = await session.get(Mailbox, mailbox_id) if mailbox_id else None
    if mailbox is None or not mailbox_access.can_manage(viewer, mailbox):
        raise NotFound("Mailbox", ["mailboxId"])
    if mailbox.owner_id != viewer.user.id:
        raise ServiceError(
            ErrorCode.NOT_MAILBOX_OWNER,
            "Only the mailbox's owner can send from it.",
            ["mailboxId"],
        )
    if mailbox.status == MailboxStatus.DISCONNECTED:
        raise ServiceError(
            ErrorCode.MAILBOX_DISCONNECTED,
            "This mailbox is disconnected: connect it again to send from it.",
            ["mailboxId"],
        )
    if mailbox.status == MailboxStatus.SUSPENDED:
        raise ServiceError(
            ErrorCode.MAILBOX_SUSPENDED,
            "This mailbox is suspended after 48 hours of failures: reconnect it to send.",
            ["mailboxId"],
        )
    if mailbox.status == MailboxStatus.ERROR:
        last = (await mailbox_queries.latest_errors(session, [mailbox.id])).get(mailbox.id)
        if isinstance(last, SyncErrorEntry) and last.code in REVOKED:
            raise ServiceError(
                ErrorCode.ACCESS_REVOKED,
                "mailsync lost access to this mailbox: reconnect it to send.",
                ["mailboxId"],
            )
    return mailbox


def _checked(request: SendRequest, limits: SendLimits) -> tuple[list[str], list[str], list[str]]:
    """Every problem of the input at once, each with its field's path."""
    problems: list[ServiceError] = []
    lists: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    for name, given in (("to", request.to), ("cc", request.cc), ("bcc", request.bcc)):
        for i, address in enumerate(given):
            try:
                lists[name].append(validate_address(address, [name, str(i)]))
            except ServiceError as exc:
                problems.append(exc)
    count = sum(len(given) for given in (request.to, request.cc, request.bcc))
    if count == 0:
        problems.append(
            ServiceError(ErrorCode.NO_RECIPIENTS, "Add at least one recipient.", ["to"])
        )
    elif count > limits.max_recipients:
        problems.append(
            ServiceError(
                ErrorCode.TOO_MANY_RECIPIENTS,
                f"This mailbox sends to at most {limits.max_recipients} recipients at once.",
                ["to"],
            )
        )
    texts = {
        "subject": request.subject,
        "bodyText": request.body_text,
        "bodyHtml": request.body_html,
        "idempotencyKey": request.idempotency_key,
    }
    unstorable_texts = {
        name: problem
        for name, text in texts.items()
        if text is not None and (problem := unstorable(text)) is not None
    }
    for name, problem in unstorable_texts.items():
        problems.append(
            ServiceError(ErrorCode.INVALID_TEXT, f"`{name}` contains {problem}.", [name])
        )
    if unstorable_texts:
        raise ServiceErrors(problems)
    if "\r" in request.subject or "\n" in request.subject:
        problems.append(
            ServiceError(
                ErrorCode.INVALID_ARGUMENT, "The subject must be a single line.", ["subject"]
            )
        )
    elif len(request.subject) > MAX_SUBJECT_CHARS:
        problems.append(
            ServiceError(
                ErrorCode.SUBJECT_TOO_LONG,
                f"Keep the subject under {MAX_SUBJECT_CHARS} characters.",
                ["subject"],
            )
        )
    for name, body in (("bodyText", request.body_text), ("bodyHtml", request.body_html)):
        if body is not None and len(body.encode()) > MAX_BODY_BYTES:
            problems.append(
                ServiceError(ErrorCode.BODY_TOO_LARGE, "The body is larger than 5 MB.", [name])
            )
    key = request.idempotency_key
    if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
        problems.append(
            ServiceError(
                ErrorCode.INVALID_ARGUMENT,
                f"An idempotency key has 1 to {MAX_KEY_CHARS} characters.",
                ["idempotencyKey"],
            )
        )
    if problems:
        raise ServiceErrors(problems)
    return lists["to"], lists["cc"], lists["bcc"]


async def _replied(
    session: AsyncSession, viewer: Viewer, mailbox: Mailbox, email_id: uuid.UUID | None
) -> tuple[Email | None, str | None]:
    """The email replied to, and its provider thread in this mailbox (R9) if the mailbox has
    seen it."""
    if email_id is None:
        return None, None
    original = await session.get(Email, email_id)
    if original is None or original.workspace_id != viewer.workspace_id:
        raise NotFound("Email", ["inReplyToEmailId"])
    source = await session.get(Mailbox, original.mailbox_id) if original.mailbox_id else None
    if source is not None and access_for(viewer, source.visibility, source.owner_id) != Access.ALL:
        # R17: a reply quotes its thread; mail the viewer may not read is not theirs to answer.
        raise NotFound("Email", ["inReplyToEmailId"])
    sighting = (
        await session.scalars(
            select(MailboxMessage.provider_thread_id).where(
                MailboxMessage.email_id == original.id, MailboxMessage.mailbox_id == mailbox.id
            )
        )
    ).first()
    return original, sighting


async def _contacts_for(
    session: AsyncSession, workspace: Workspace, mailbox: Mailbox, raw: bytes
) -> tuple[list[Contact], ParsedMessage]:
    """R2/R4/R5 for CRM-sent mail: To/Cc contacts, excluded or not; new contacts as the
    workspace's auto-creation says for sent mail."""
    parsed = parse_message(raw)
    ctx = FilingContext(
        own_addresses=await mailbox_queries.own_addresses(session, workspace.id),
        excluded=frozenset(),
        auto_creation=workspace.contact_auto_creation,
        sync_mode=SyncMode.TWO_WAY,
    )
    decision = decide(parsed, ctx, source=EmailSource.CRM)
    contacts = await contacts_service.contacts_to_file_on(
        session, workspace, decision.candidates, decision.creatable
    )
    return contacts, parsed


async def _file(
    session: AsyncSession,
    workspace: Workspace,
    mailbox: Mailbox,
    sender: User,
    request: SendRequest,
    raw: bytes,
    message_id: str,
    moment: datetime,
    original: Email | None,
) -> tuple[Email, list[Contact]]:
    """File the CRM email as sync would file its Sent copy: parsed from the very MIME."""
    contacts, parsed = await _contacts_for(session, workspace, mailbox, raw)
    thread = await session.get(Thread, original.thread_id) if original else None
    if thread is None:
        thread = Thread(workspace_id=workspace.id, subject=parsed.subject, last_email_at=moment)
        session.add(thread)
        await session.flush()
    participants = [
        ParticipantData(role=role, address=p.address, name=p.name)
        for role, group in (
            (ParticipantRole.FROM, [parsed.sender] if parsed.sender else []),
            (ParticipantRole.TO, parsed.to),
            (ParticipantRole.CC, parsed.cc),
            (ParticipantRole.BCC, parsed.bcc),
        )
        for p in group
    ]
    data = NewEmail(
        message_id=message_id,
        direction=EmailDirection.OUTGOING,
        sent_at=moment,
        participants=participants,
        source=EmailSource.CRM,
        subject=parsed.subject,
        snippet=parsed.snippet,
        body_text=parsed.body_text,
        body_html=parsed.body_html,
        in_reply_to=parsed.in_reply_to,
        references=parsed.references,
        headers=parsed.headers,
        attachments=parsed.attachments,
        sent_by_id=sender.id,
        delivery_status=DeliveryStatus.QUEUED,
        idempotency_key=request.idempotency_key,
    )
    email = await store_email(
        session,
        workspace_id=workspace.id,
        thread=thread,
        mailbox_id=mailbox.id,
        data=data,
        contacts=contacts,
    )
    return email, contacts


async def queue_email(
    session: AsyncSession, effects: AfterCommit, viewer: Viewer, request: SendRequest
) -> Email:
    """File the email now (source CRM, QUEUED) and queue its send (R15). The same
    idempotency key from the same user returns the first email and sends nothing more."""
    earlier = await _earlier_send(session, viewer, request.idempotency_key)
    if earlier is not None:
        return earlier
    mailbox = await _sending_mailbox(session, viewer, request.mailbox_id)
    limits = limits_for(mailbox.provider)
    to, cc, bcc = _checked(request, limits)
    original, provider_thread = await _replied(
        session, viewer, mailbox, request.in_reply_to_email_id
    )
    sender = await session.get(User, mailbox.owner_id)
    workspace = await session.get(Workspace, mailbox.workspace_id)
    assert sender is not None and workspace is not None
    moment = now().replace(microsecond=0)
    draft = Draft(
        sender_name=sender.name,
        sender_address=mailbox.email_address,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=request.subject,
        body_text=request.body_text,
        body_html=request.body_html,
        in_reply_to=original.message_id if original else None,
        references=[*original.references, original.message_id] if original else [],
    )
    message_id = new_message_id(mailbox.email_address)
    raw = compose(draft, message_id=message_id, date=moment)
    if len(raw) > limits.max_bytes:
        raise ServiceError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"This mailbox's provider accepts messages up to {limits.max_bytes // 1024} KB.",
            ["bodyHtml" if request.body_html is not None else "bodyText"],
        )
    try:
        # Contacts, thread, email and its MIME: all or nothing, so a request that loses an
        # idempotency race leaves nothing behind and answers with the winner's email.
        async with session.begin_nested():
            email, contacts = await _file(
                session, workspace, mailbox, sender, request, raw, message_id, moment, original
            )
            session.add(
                OutgoingMessage(
                    email_id=email.id,
                    mailbox_id=mailbox.id,
                    raw=raw,
                    provider_thread_id=provider_thread,
                )
            )
            await session.flush()
    except IntegrityError:
        earlier = await _earlier_send(session, viewer, request.idempotency_key)
        if earlier is None:
            raise
        return earlier
    effects.publish(
        workspace.id,
        email_received_event(email.id, email.thread_id, mailbox.id, [c.id for c in contacts]),
    )
    effects.request_send(email.id)
    return email


async def _timeline_contacts(session: AsyncSession, email: Email) -> list[uuid.UUID]:
    rows = await session.scalars(
        select(TimelineEntry.contact_id).where(TimelineEntry.email_id == email.id)
    )
    return list(rows)


async def record_sent(
    session: AsyncSession, effects: AfterCommit, email: Email, mailbox: Mailbox, sent: SentMessage
) -> None:
    """SENT, with the provider's ids, so the provider thread joins the email's (R9) and the
    Sent copy, when sync brings it, is recognised as this email (R7)."""
    email.delivery_status = DeliveryStatus.SENT
    email.delivery_error = None
    session.add(email)
    if sent.provider_id:
        seen = await session.scalars(
            select(MailboxMessage.id).where(
                MailboxMessage.mailbox_id == mailbox.id,
                MailboxMessage.provider_message_id == sent.provider_id,
            )
        )
        if seen.first() is None:
            session.add(
                MailboxMessage(
                    mailbox_id=mailbox.id,
                    email_id=email.id,
                    provider_message_id=sent.provider_id,
                    provider_thread_id=sent.thread_id,
                )
            )
    await _settle(session, effects, email)


async def record_failed(
    session: AsyncSession, effects: AfterCommit, email: Email, mailbox: Mailbox, error: Exception
) -> None:
    """FAILED with a reason the user can act on; the mailbox's error log shows SEND_FAILED."""
    mailbox_code = SyncErrorCode.SEND_FAILED
    if isinstance(error, SendRejected):
        code = REJECTION_CODES[error.reason]
    elif isinstance(error, ProviderError) and error.code in REVOKED:
        # Not the message's fault: the mailbox lost its access, and the user must reconnect.
        code, mailbox_code = ErrorCode[error.code.value], error.code
    else:
        code = ErrorCode.SEND_FAILED
    detail = getattr(error, "detail", None) or str(error)
    email.delivery_status = DeliveryStatus.FAILED
    email.delivery_error = f"{code.value}: {code.meaning} ({detail[:500]})"
    session.add(email)
    record_error(session, mailbox.id, mailbox_code, detail[:2000])
    await _settle(session, effects, email)


async def _settle(session: AsyncSession, effects: AfterCommit, email: Email) -> None:
    outgoing = await session.get(OutgoingMessage, email.id)
    if outgoing is not None:
        await session.delete(outgoing)
    await session.flush()
    contact_ids = await _timeline_contacts(session, email)
    effects.publish(email.workspace_id, delivery_event(email, contact_ids))
