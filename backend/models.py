"""Every table, imported once so metadata (Alembic, tests) sees the whole schema."""

from backend.auth.tables import ApiToken, User, Workspace
from backend.contacts.tables import Contact, ContactAddress
from backend.events.outbox import OutboxEntry
from backend.exclusions.tables import Exclusion
from backend.mail.tables import (
    DeletedMessage,
    Email,
    MailboxMessage,
    Participant,
    Thread,
    TimelineEntry,
)
from backend.mailboxes.tables import Mailbox, ProviderIssue, SyncActivityDay, SyncErrorEntry
from backend.sending.tables import OutgoingMessage
from backend.sync.tables import SyncBacklog

__all__ = [
    "ApiToken",
    "Contact",
    "ContactAddress",
    "DeletedMessage",
    "Email",
    "Exclusion",
    "Mailbox",
    "MailboxMessage",
    "OutboxEntry",
    "OutgoingMessage",
    "Participant",
    "ProviderIssue",
    "SyncActivityDay",
    "SyncBacklog",
    "SyncErrorEntry",
    "Thread",
    "TimelineEntry",
    "User",
    "Workspace",
]
