from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from backend.db import UtcDateTime
from backend.kit.clock import now


class OutgoingMessage(SQLModel, table=True):
    """The exact MIME of a CRM email waiting to be sent, kept until the send is settled so
    the job sends what the user wrote, byte for byte, however often it is retried."""

    __tablename__ = "outgoing_messages"

    email_id: uuid.UUID = Field(foreign_key="emails.id", ondelete="CASCADE", primary_key=True)
    mailbox_id: uuid.UUID = Field(foreign_key="mailboxes.id", ondelete="CASCADE", index=True)
    raw: bytes = Field(sa_type=sa.LargeBinary)
    # The provider thread to send into (a reply), when the mailbox has seen the original.
    provider_thread_id: str | None = Field(default=None, max_length=400)
    # Started sends: after the first, the provider may already have the message (R15), so
    # the job looks for it before sending again.
    attempts: int = 0
    last_attempt_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # When an SMTP server accepted it (IMAP mailboxes), committed before the APPEND to Sent:
    # a retry then only files the Sent copy (R15), since SMTP cannot be asked what it has.
    smtp_accepted_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
