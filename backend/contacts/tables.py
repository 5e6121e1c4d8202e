from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import relationship
from sqlmodel import Field, Relationship, SQLModel

from backend.db import UtcDateTime
from backend.kit.clock import now


class Contact(SQLModel, table=True):
    __tablename__ = "contacts"
    __table_args__ = (
        sa.Index("ix_contacts_workspace_created", "workspace_id", "created_at", "id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    name: str | None = Field(default=None, max_length=200)
    owner_id: uuid.UUID | None = Field(default=None, foreign_key="users.id", ondelete="SET NULL")
    email_sync_enabled: bool = True
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
    last_email_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Emails on the contact's timeline, kept by database triggers on timeline_entries
    # (migration 0008); never written by the ORM.
    timeline_count: int = Field(default=0, sa_column_kwargs={"server_default": "0"})

    addresses: list[ContactAddress] = Relationship(
        sa_relationship=relationship(
            "ContactAddress", lazy="raise", order_by="ContactAddress.position", viewonly=True
        )
    )


class ContactAddress(SQLModel, table=True):
    """A contact's addresses, normalized (R2); position 0 is the main address."""

    __tablename__ = "contact_addresses"
    __table_args__ = (
        sa.UniqueConstraint("contact_id", "address"),
        # R2 lookup: address -> contacts within a workspace.
        sa.Index("ix_contact_addresses_lookup", "workspace_id", "address"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    contact_id: uuid.UUID = Field(foreign_key="contacts.id", ondelete="CASCADE", index=True)
    address: str = Field(max_length=320)
    position: int = 0
