"""Tenancy and identity: workspaces, their users, and the tokens users call the API with."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlmodel import Field, SQLModel

from backend.db import UtcDateTime, enum_type
from backend.kit.clock import now


class Role(enum.StrEnum):
    OWNER = "OWNER"
    ADMIN = "ADMIN"
    USER = "USER"


class ContactMatching(enum.StrEnum):
    PRIMARY_EMAIL_ONLY = "PRIMARY_EMAIL_ONLY"
    ALL_EMAILS = "ALL_EMAILS"


class ContactAutoCreation(enum.StrEnum):
    NONE = "NONE"
    SENT = "SENT"
    SENT_AND_RECEIVED = "SENT_AND_RECEIVED"


class Workspace(SQLModel, table=True):
    __tablename__ = "workspaces"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=200)
    # The local part of the workspace's capture address (R16); random so it cannot be guessed.
    capture_key: str = Field(max_length=64, unique=True)
    contact_matching: ContactMatching = Field(
        default=ContactMatching.ALL_EMAILS, sa_type=enum_type(ContactMatching)
    )
    contact_auto_creation: ContactAutoCreation = Field(
        default=ContactAutoCreation.NONE, sa_type=enum_type(ContactAutoCreation)
    )
    mailbox_limit: int | None = None
    # Tag synced mail in the user's mailbox ("CRM" label in Gmail, category in Outlook).
    label_synced_mail: bool = False
    # Moves whenever a user's or a mailbox's addresses change (database triggers, migration
    # 0008): the key of the API's cache of the workspace's own addresses.
    addresses_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", index=True, ondelete="CASCADE")
    # Login addresses are global: a token names a user, and a user belongs to one workspace.
    email: str = Field(max_length=320, unique=True)
    name: str = Field(max_length=200)
    role: Role = Field(default=Role.USER, sa_type=enum_type(Role))
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)


class ApiToken(SQLModel, table=True):
    """One issued bearer token; the row is what makes a signed token revocable."""

    __tablename__ = "api_tokens"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="users.id", index=True, ondelete="CASCADE")
    expires_at: datetime = Field(sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
