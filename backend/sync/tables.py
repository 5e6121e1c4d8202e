from __future__ import annotations

import enum
import uuid
from datetime import date, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from backend.db import UtcDateTime, enum_type
from backend.kit.clock import now


class SyncErrorCode(enum.StrEnum):
    ACCESS_DENIED = "ACCESS_DENIED"
    ACCESS_REVOKED = "ACCESS_REVOKED"
    MAILBOX_NOT_FOUND = "MAILBOX_NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    SEND_FAILED = "SEND_FAILED"
    READ_FAILED = "READ_FAILED"
    IMPORT_FAILED = "IMPORT_FAILED"


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
