"""Live events from the process's EventHub: on websockets through the fan-out (api/fanout.py),
elsewhere each resolved in a fresh scope."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime
from typing import Any

import strawberry

from backend.api import fanout
from backend.api.fanout import Prepare
from backend.contacts import loaders as contact_loaders
from backend.contacts.types import Contact
from backend.events import bus
from backend.graphql.context import Info, current_scope
from backend.graphql.errors import require_viewer
from backend.graphql.relay import id_of
from backend.kit import clock
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes.access import can_manage
from backend.mailboxes.tables import Mailbox as MailboxRow
from backend.mailboxes.types import Mailbox, MailboxStatus
from backend.timeline import loaders as timeline_loaders
from backend.timeline import queries as timeline_queries
from backend.timeline.access import Access, access_for
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


EVENTS_MISSED_HINT = (
    "Events may have been missed: read again what you show (Apollo: "
    'client.refetchQueries({ include: "active" })). Subscriptions stay open.'
)


@strawberry.type(
    description="Events of the workspace may have been missed: this server could not follow its "
    "event stream without a gap (its Redis lost its data, or the stream was trimmed past "
    "the server's reader). Whatever was kept up to date from subscriptions may be stale."
)
class EventsMissedEvent:
    detected_at: datetime = strawberry.field(
        description="When the server noticed. Events published before it, since the last one "
        "a subscription delivered, may be missing; those published after it arrive."
    )
    hint: str = strawberry.field(
        description="What to do, for people reading logs: read again what you show."
    )


async def _stream(info: Info, prepare: Prepare) -> AsyncIterator[Any]:
    """The viewer's workspace's events as `prepare` makes them ready. On a websocket they go
    through the fan-out (one resolution per event and group, api/fanout.py) and nothing is
    yielded here; elsewhere (multipart over HTTP) each event is resolved in a scope of its own."""
    viewer = require_viewer(info)
    context = info.context
    hub = context.runtime.hub
    if hub is None:
        raise RuntimeError("this process has no event hub")
    if await fanout.serve(info, prepare, MAX_LIFETIME_SECONDS):
        return
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
            async with context.runtime.unit_of_work(read_only=True) as work:
                work.discard()  # resolving an event only reads
                current_scope.set(context.open_scope(work))
                try:
                    prepared = await prepare(event, info)
                    if prepared is not None and prepared[1](viewer) is not None:
                        yield prepared[0]
                finally:
                    current_scope.set(None)


def _uuid(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _email_events(
    kind: str,
    contact_id: strawberry.ID | None,
    thread_id: strawberry.ID | None,
    mailbox_id: strawberry.ID | None,
) -> Prepare:
    """Events about one email, narrowed by contact, thread and mailbox when given; a viewer's
    class is what R17 lets them read of it and whether they manage its mailbox."""
    want_contact = id_of(contact_id, "Contact")
    want_thread = id_of(thread_id, "Thread")
    want_mailbox = id_of(mailbox_id, "Mailbox")

    async def prepare(event: dict[str, Any], info: Info) -> fanout.Prepared:
        if event.get("type") != kind:
            return None
        contact_ids = [c for c in (_uuid(v) for v in event.get("contactIds", [])) if c]
        if contact_id is not None and want_contact not in contact_ids:
            return None
        if thread_id is not None and _uuid(event.get("threadId")) != want_thread:
            return None
        if mailbox_id is not None and _uuid(event.get("mailboxId")) != want_mailbox:
            return None
        email_id = _uuid(event.get("emailId"))
        email = await timeline_loaders.email(info).load(email_id) if email_id else None
        if email is None:
            return None  # deleted again before we got to it
        contacts = await contact_loaders.contacts(info, contact_ids)
        root = EmailEvent(
            email=Email(row=email),
            contacts=[Contact(row=c) for c in contacts],
            cursor=timeline_queries.timeline_cursor(email),
        )
        mailbox = (
            await mailbox_loaders.mailbox(info).load(email.mailbox_id) if email.mailbox_id else None
        )
        if mailbox is None:
            return root, lambda viewer: Access.ALL
        return root, lambda viewer: (
            access_for(viewer, mailbox.visibility, mailbox.owner_id),
            can_manage(viewer, mailbox),
        )

    return prepare


def _mailbox_events(
    kind: str,
    mailbox_id: strawberry.ID | None,
    root: Callable[[dict[str, Any], MailboxRow], object],
) -> Prepare:
    """Events about a mailbox, for those who manage it, narrowed to one mailbox when given."""
    want = id_of(mailbox_id, "Mailbox")

    async def prepare(event: dict[str, Any], info: Info) -> fanout.Prepared:
        if event.get("type") != kind:
            return None
        row_id = _uuid(event.get("mailboxId"))
        if row_id is None or (mailbox_id is not None and row_id != want):
            return None
        mailbox = await mailbox_loaders.mailbox(info).load(row_id)
        if mailbox is None:
            return None
        return root(event, mailbox), lambda viewer: True if can_manage(viewer, mailbox) else None

    return prepare


async def _events_missed(event: dict[str, Any], info: Info) -> fanout.Prepared:
    """The hub's gap signal, the same for every viewer (one execution for all subscribers)."""
    if event.get("type") != bus.GAP["type"]:
        return None
    try:
        detected_at = datetime.fromisoformat(str(event[bus.GAP_AT]))
    except (KeyError, ValueError):
        detected_at = clock.now()
    root = EventsMissedEvent(detected_at=detected_at, hint=EVENTS_MISSED_HINT)
    return root, lambda viewer: True


def _status_event(event: dict[str, Any], mailbox: MailboxRow) -> MailboxStatusEvent:
    return MailboxStatusEvent(
        mailbox=Mailbox(row=mailbox), previous_status=MailboxStatus(event["previousStatus"])
    )


def _pass_event(event: dict[str, Any], mailbox: MailboxRow) -> SyncPassEvent:
    return SyncPassEvent(
        mailbox=Mailbox(row=mailbox),
        filed=int(event.get("filed", 0)),
        failed=int(event.get("failed", 0)),
        started_at=datetime.fromisoformat(event["startedAt"]),
        finished_at=datetime.fromisoformat(event["finishedAt"]),
    )


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
        async for event in _stream(
            info, _email_events("emailReceived", contact_id, thread_id, mailbox_id)
        ):
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
        async for event in _stream(
            info, _email_events("emailDeliveryChanged", contact_id, None, mailbox_id)
        ):
            yield event

    @strawberry.subscription(
        description="Captured mail matched no contact and waits in the unassigned list (R16)."
    )
    async def unassigned_email_received(self, info: Info) -> AsyncGenerator[EmailEvent, None]:
        async for event in _stream(
            info, _email_events("unassignedEmailReceived", None, None, None)
        ):
            yield event

    @strawberry.subscription(
        description="A mailbox changed status (PENDING -> ACTIVE, ACTIVE -> ERROR, ...)."
    )
    async def mailbox_status_changed(
        self, info: Info, mailbox_id: strawberry.ID | None = None
    ) -> AsyncGenerator[MailboxStatusEvent, None]:
        async for event in _stream(
            info, _mailbox_events("mailboxStatusChanged", mailbox_id, _status_event)
        ):
            yield event

    @strawberry.subscription(description='A sync pass finished (so "last synced" can update live).')
    async def sync_pass_completed(
        self, info: Info, mailbox_id: strawberry.ID | None = None
    ) -> AsyncGenerator[SyncPassEvent, None]:
        async for event in _stream(
            info, _mailbox_events("syncPassCompleted", mailbox_id, _pass_event)
        ):
            yield event

    @strawberry.subscription(
        description="Events may have been missed (see `EventsMissedEvent`): read again what "
        "you show. Subscribe to it beside the others (one more operation on the same "
        "websocket); it yields nothing but gaps. After a reconnect of its own a client "
        "may have missed events too, and is not told: read again then as well."
    )
    async def events_missed(self, info: Info) -> AsyncGenerator[EventsMissedEvent, None]:
        async for event in _stream(info, _events_missed):
            yield event
