"""Live events: delivered from the process's EventHub, each resolved in a fresh scope."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any

import strawberry

from backend.contacts import loaders as contact_loaders
from backend.contacts.types import Contact
from backend.graphql.context import Info, current_scope
from backend.graphql.errors import require_viewer
from backend.graphql.relay import id_of
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes.access import can_manage
from backend.mailboxes.tables import Mailbox as MailboxRow
from backend.mailboxes.types import Mailbox, MailboxStatus
from backend.timeline import loaders as timeline_loaders
from backend.timeline import queries as timeline_queries
from backend.timeline.types import Email

# A subscription ends after this long; clients reconnect (and re-authenticate).
MAX_LIFETIME_SECONDS = 24 * 3600


@strawberry.type
class EmailEvent:
    email: Email
    contacts: list[Contact]
    cursor: str = strawberry.field(
        description="The email's cursor in timeline order (as the edges of `emails` and "
        "`Contact.timeline` carry it), to insert it into a cached connection."
    )


@strawberry.type
class MailboxStatusEvent:
    mailbox: Mailbox
    previous_status: MailboxStatus


@strawberry.type
class SyncPassEvent:
    mailbox: Mailbox
    filed: int
    failed: int
    started_at: datetime
    finished_at: datetime


async def _events(info: Info, kind: str) -> AsyncIterator[dict[str, Any]]:
    """Events of one kind for the viewer's workspace, each resolved in a scope of its own."""
    viewer = require_viewer(info)
    context = info.context
    hub = context.runtime.hub
    if hub is None:
        raise RuntimeError("this process has no event hub")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_LIFETIME_SECONDS
    async with hub.subscribe(str(viewer.workspace_id)) as queue:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                event = await asyncio.wait_for(queue.get(), timeout=remaining)
            except TimeoutError:
                return
            if event.get("type") != kind:
                continue
            async with context.runtime.unit_of_work(read_only=True) as work:
                work.discard()  # resolving an event only reads
                current_scope.set(context.open_scope(work))
                try:
                    yield event
                finally:
                    current_scope.set(None)


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


async def _email_events(
    info: Info,
    kind: str,
    contact_id: strawberry.ID | None,
    thread_id: strawberry.ID | None,
    mailbox_id: strawberry.ID | None,
) -> AsyncIterator[EmailEvent]:
    """Events about one email, narrowed by contact, thread and mailbox when given."""
    want_contact = id_of(contact_id, "Contact")
    want_thread = id_of(thread_id, "Thread")
    want_mailbox = id_of(mailbox_id, "Mailbox")
    async for event in _events(info, kind):
        contact_ids = [c for c in (_uuid(v) for v in event.get("contactIds", [])) if c]
        if contact_id is not None and want_contact not in contact_ids:
            continue
        if thread_id is not None and _uuid(event.get("threadId")) != want_thread:
            continue
        if mailbox_id is not None and _uuid(event.get("mailboxId")) != want_mailbox:
            continue
        email_id = _uuid(event.get("emailId"))
        email = await timeline_loaders.email(info).load(email_id) if email_id else None
        if email is None:
            continue  # deleted again before we got to it
        contacts = await contact_loaders.contacts(info, contact_ids)
        yield EmailEvent(
            email=Email(row=email),
            contacts=[Contact(row=c) for c in contacts],
            cursor=timeline_queries.timeline_cursor(email),
        )


async def _mailbox_events(
    info: Info, kind: str, mailbox_id: strawberry.ID | None
) -> AsyncIterator[tuple[dict[str, Any], MailboxRow]]:
    """Events about a mailbox the viewer manages, narrowed to one mailbox when given."""
    viewer = require_viewer(info)
    want = id_of(mailbox_id, "Mailbox")
    async for event in _events(info, kind):
        row_id = _uuid(event.get("mailboxId"))
        if row_id is None or (mailbox_id is not None and row_id != want):
            continue
        mailbox = await mailbox_loaders.mailbox(info).load(row_id)
        if mailbox is not None and can_manage(viewer, mailbox):
            yield event, mailbox


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="A new email was filed; arguments narrow the stream; none: the whole workspace."
    )
    async def email_received(
        self,
        info: Info,
        contact_id: strawberry.ID | None = None,
        thread_id: strawberry.ID | None = None,
        mailbox_id: strawberry.ID | None = None,
    ) -> AsyncGenerator[EmailEvent, None]:
        async for event in _email_events(info, "emailReceived", contact_id, thread_id, mailbox_id):
            yield event

    @strawberry.subscription(
        description="A CRM-sent email became SENT or FAILED (R15), so a timeline can turn "
        '"sending..." into "sent" without polling.'
    )
    async def email_delivery_changed(
        self,
        info: Info,
        mailbox_id: strawberry.ID | None = None,
        contact_id: strawberry.ID | None = None,
    ) -> AsyncGenerator[EmailEvent, None]:
        async for event in _email_events(
            info, "emailDeliveryChanged", contact_id, None, mailbox_id
        ):
            yield event

    @strawberry.subscription(
        description="Captured mail matched no contact and waits in the unassigned list (R16)."
    )
    async def unassigned_email_received(self, info: Info) -> AsyncGenerator[EmailEvent, None]:
        async for event in _email_events(info, "unassignedEmailReceived", None, None, None):
            yield event

    @strawberry.subscription(
        description="A mailbox changed status (PENDING -> ACTIVE, ACTIVE -> ERROR, ...)."
    )
    async def mailbox_status_changed(
        self, info: Info, mailbox_id: strawberry.ID | None = None
    ) -> AsyncGenerator[MailboxStatusEvent, None]:
        async for event, mailbox in _mailbox_events(info, "mailboxStatusChanged", mailbox_id):
            yield MailboxStatusEvent(
                mailbox=Mailbox(row=mailbox), previous_status=MailboxStatus(event["previousStatus"])
            )

    @strawberry.subscription(description='A sync pass finished (so "last synced" can update live).')
    async def sync_pass_completed(
        self, info: Info, mailbox_id: strawberry.ID | None = None
    ) -> AsyncGenerator[SyncPassEvent, None]:
        async for event, mailbox in _mailbox_events(info, "syncPassCompleted", mailbox_id):
            yield SyncPassEvent(
                mailbox=Mailbox(row=mailbox),
                filed=int(event.get("filed", 0)),
                failed=int(event.get("failed", 0)),
                started_at=datetime.fromisoformat(event["startedAt"]),
                finished_at=datetime.fromisoformat(event["finishedAt"]),
            )
