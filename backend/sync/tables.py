"""What a pass still has to fetch, saved as it goes (docs/architecture.md, "Sync")."""

from __future__ import annotations

import uuid

from sqlmodel import Field, SQLModel


class SyncBacklog(SQLModel, table=True):
    """A message a pass listed and has not filed yet. A change set larger than one batch is
    saved here with the provider's new cursor, and each batch deletes its rows as it is filed,
    so an interrupted pass resumes where it stopped instead of listing and fetching again."""

    __tablename__ = "sync_backlog"

    mailbox_id: uuid.UUID = Field(foreign_key="mailboxes.id", ondelete="CASCADE", primary_key=True)
    position: int = Field(primary_key=True)
    provider_id: str = Field(max_length=400)
    thread_id: str | None = Field(default=None, max_length=400)
