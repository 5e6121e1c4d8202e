from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from backend.db import UtcDateTime, enum_type
from backend.kit.clock import now
from backend.providers.base import Provider, SyncErrorCode


class SyncMode(enum.StrEnum):
    TWO_WAY = "TWO_WAY"
    CRM_THREADS_ONLY = "CRM_THREADS_ONLY"
    ONE_WAY = "ONE_WAY"


class EmailVisibility(enum.StrEnum):
    SHARE_EVERYTHING = "SHARE_EVERYTHING"
    SUBJECT_ONLY = "SUBJECT_ONLY"
    METADATA_ONLY = "METADATA_ONLY"


class MailboxStatus(enum.StrEnum):
    PENDING = "PENDING"
    PENDING_LIMIT = "PENDING_LIMIT"
    ACTIVE = "ACTIVE"
    ERROR = "ERROR"
    SUSPENDED = "SUSPENDED"
    DISCONNECTED = "DISCONNECTED"


class Mailbox(SQLModel, table=True):
    __tablename__ = "mailboxes"
    __table_args__ = (
        sa.Index("ix_mailboxes_workspace_owner", "workspace_id", "owner_id"),
        # The scheduler's scan: which mailboxes are due.
        sa.Index("ix_mailboxes_status_next_attempt", "status", "next_attempt_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    owner_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE")
    provider: Provider = Field(sa_type=enum_type(Provider))
    email_address: str = Field(max_length=320)
    # Own addresses beyond email_address: Gmail send-as, Microsoft proxy addresses (R1, R8).
    aliases: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    status: MailboxStatus = Field(default=MailboxStatus.PENDING, sa_type=enum_type(MailboxStatus))
    sync_mode: SyncMode = Field(default=SyncMode.TWO_WAY, sa_type=enum_type(SyncMode))
    visibility: EmailVisibility = Field(
        default=EmailVisibility.SHARE_EVERYTHING, sa_type=enum_type(EmailVisibility)
    )
    # Fernet ciphertext of the provider credentials (kit.crypto); never logged, never exposed.
    credentials_encrypted: str | None = Field(default=None, sa_type=sa.Text)
    # Provider position (history id, delta links, UIDVALIDITY/UID); saved with the mail it covers.
    cursor: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    connected_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    last_synced_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_email_synced_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Start of the current failure streak: SUSPENDED 48 hours after it (R13).
    failing_since: datetime | None = Field(default=None, sa_type=UtcDateTime)
    consecutive_failures: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Last Gmail watch / Graph subscription; renewed by a pass once it is a day old.
    push_renewed_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    disconnected_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class SyncErrorEntry(SQLModel, table=True):
    """The mailbox's error log (R13); the newest entry is `lastError` while it is failing."""

    __tablename__ = "sync_errors"
    __table_args__ = (sa.Index("ix_sync_errors_mailbox_time", "mailbox_id", "occurred_at", "id"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    mailbox_id: uuid.UUID = Field(foreign_key="mailboxes.id", ondelete="CASCADE")
    code: SyncErrorCode = Field(sa_type=enum_type(SyncErrorCode))
    message: str = Field(sa_type=sa.Text)
    recommendation: str = Field(sa_type=sa.Text)
    # Provider reference (message id) or technical detail; never credentials.
    detail: str | None = Field(default=None, sa_type=sa.Text)
    occurred_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class SyncActivityDay(SQLModel, table=True):
    """Per-day counters behind `Mailbox.activity(days)`."""

    __tablename__ = "sync_activity"

    mailbox_id: uuid.UUID = Field(foreign_key="mailboxes.id", ondelete="CASCADE", primary_key=True)
    day: date = Field(primary_key=True)
    queued: int = 0
    synced: int = 0
    failed: int = 0


class ProviderProblem(enum.StrEnum):
    """What a provider refuses: its value is what `/readyz` shows as `problem`."""

    # Passes fail (client id, secret, registration); cleared when a mailbox failed so syncs.
    CONFIGURATION = "configuration"
    # Gmail `watch` refused (no publish rights on the topic): passes go on, by polling only;
    # cleared when a later watch succeeds.
    PUSH = "push"


class ProviderIssue(SQLModel, table=True):
    """A provider refusing mailsync itself (its configuration: client id, secret, topic), for
    the operator's health checks, one entry per provider and problem. The worker writes it
    when a pass (or its push renewal) is refused so, and deletes it once that works again;
    the API's `/readyz` lists it."""

    __tablename__ = "provider_issues"

    provider: Provider = Field(sa_type=enum_type(Provider), primary_key=True)
    problem: ProviderProblem = Field(
        default=ProviderProblem.CONFIGURATION, sa_type=enum_type(ProviderProblem), primary_key=True
    )
    # Which setting to check; the detail is the provider's answer (never a credential).
    fix: str = Field(sa_type=sa.Text)
    detail: str = Field(sa_type=sa.Text)
    first_seen_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    last_seen_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    # Refusals (failed passes, refused watches) since first seen: how widespread it is.
    failures: int = 1
