from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import relationship
from sqlmodel import Field, Relationship, SQLModel

from backend.db import UtcDateTime, enum_type
from backend.kit.clock import now


class EmailDirection(enum.StrEnum):
    INCOMING = "INCOMING"
    OUTGOING = "OUTGOING"


class EmailSource(enum.StrEnum):
    SYNC = "SYNC"
    CRM = "CRM"
    CAPTURE = "CAPTURE"


class DeliveryStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    SENT = "SENT"
    FAILED = "FAILED"


class ParticipantRole(enum.StrEnum):
    FROM = "FROM"
    TO = "TO"
    CC = "CC"
    BCC = "BCC"


class Thread(SQLModel, table=True):
    __tablename__ = "threads"
    __table_args__ = (sa.Index("ix_threads_workspace_last", "workspace_id", "last_email_at", "id"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    subject: str | None = Field(default=None, sa_type=sa.Text)
    last_email_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    email_count: int = 0
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class Email(SQLModel, table=True):
    __tablename__ = "emails"
    __table_args__ = (
        # R7: one row per message per workspace.
        sa.UniqueConstraint("workspace_id", "message_id"),
        sa.Index("ix_emails_workspace_sent", "workspace_id", "sent_at", "id"),
        sa.Index("ix_emails_thread_sent", "thread_id", "sent_at", "id"),
        sa.Index("ix_emails_mailbox", "mailbox_id"),
        # R15: one email per idempotency key and sender.
        sa.Index(
            "ux_emails_sender_idempotency_key",
            "sent_by_id",
            "idempotency_key",
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    thread_id: uuid.UUID = Field(foreign_key="threads.id", ondelete="CASCADE")
    # The mailbox that first brought it in; null for captured mail.
    mailbox_id: uuid.UUID | None = Field(
        default=None, foreign_key="mailboxes.id", ondelete="SET NULL"
    )
    message_id: str = Field(max_length=998)
    in_reply_to: str | None = Field(default=None, max_length=998)
    references: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    direction: EmailDirection = Field(sa_type=enum_type(EmailDirection))
    source: EmailSource = Field(default=EmailSource.SYNC, sa_type=enum_type(EmailSource))
    subject: str | None = Field(default=None, sa_type=sa.Text)
    snippet: str | None = Field(default=None, max_length=200)
    body_text: str | None = Field(default=None, sa_type=sa.Text)
    body_html: str | None = Field(default=None, sa_type=sa.Text)  # sanitized (R10)
    headers: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    attachments: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)
    sent_at: datetime = Field(sa_type=UtcDateTime)
    sent_by_id: uuid.UUID | None = Field(default=None, foreign_key="users.id", ondelete="SET NULL")
    delivery_status: DeliveryStatus | None = Field(default=None, sa_type=enum_type(DeliveryStatus))
    delivery_error: str | None = Field(default=None, sa_type=sa.Text)
    idempotency_key: str | None = Field(default=None, max_length=200)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)

    participants: list[Participant] = Relationship(
        sa_relationship=relationship(
            "Participant", lazy="raise", order_by="Participant.position", viewonly=True
        )
    )


class Participant(SQLModel, table=True):
    __tablename__ = "participants"
    __table_args__ = (sa.Index("ix_participants_email", "email_id", "position"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email_id: uuid.UUID = Field(foreign_key="emails.id", ondelete="CASCADE")
    role: ParticipantRole = Field(sa_type=enum_type(ParticipantRole))
    position: int = 0
    address: str = Field(max_length=320)  # normalized (R2)
    name: str | None = Field(default=None, max_length=320)


class TimelineEntry(SQLModel, table=True):
    """An email filed on a contact's timeline."""

    __tablename__ = "timeline_entries"
    __table_args__ = (
        # A contact's timeline, newest first.
        sa.Index("ix_timeline_contact_sent", "contact_id", "sent_at", "email_id"),
        sa.Index("ix_timeline_workspace", "workspace_id"),
    )

    email_id: uuid.UUID = Field(foreign_key="emails.id", ondelete="CASCADE", primary_key=True)
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE", primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    # Copied from the email so the timeline is one index range scan.
    sent_at: datetime = Field(sa_type=UtcDateTime)
    filed_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class MailboxMessage(SQLModel, table=True):
    """A mailbox's sighting of an email: provider ids (R9 threads, R11 erase) and replays (R7)."""

    __tablename__ = "mailbox_messages"
    __table_args__ = (
        sa.UniqueConstraint("mailbox_id", "provider_message_id"),
        sa.Index("ix_mailbox_messages_email", "email_id"),
        sa.Index("ix_mailbox_messages_thread", "mailbox_id", "provider_thread_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    mailbox_id: uuid.UUID = Field(foreign_key="mailboxes.id", ondelete="CASCADE")
    email_id: uuid.UUID = Field(foreign_key="emails.id", ondelete="CASCADE")
    provider_message_id: str = Field(max_length=400)
    provider_thread_id: str | None = Field(default=None, max_length=400)
    seen_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class DeletedMessage(SQLModel, table=True):
    """R11: a Message-ID deleted from the CRM, per workspace, so that no mailbox brings it
    back (another mailbox's copy, a re-list after Gmail history or Graph delta expiry)."""

    __tablename__ = "deleted_messages"

    workspace_id: uuid.UUID = Field(
        foreign_key="workspaces.id", ondelete="CASCADE", primary_key=True
    )
    message_id: str = Field(max_length=998, primary_key=True)
    deleted_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
