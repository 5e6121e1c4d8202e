from __future__ import annotations

import enum
import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from backend.db import UtcDateTime, enum_type
from backend.kit.clock import now


class ExclusionKind(enum.StrEnum):
    ADDRESS = "ADDRESS"
    DOMAIN = "DOMAIN"


class Exclusion(SQLModel, table=True):
    __tablename__ = "exclusions"
    __table_args__ = (sa.UniqueConstraint("workspace_id", "value"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    workspace_id: uuid.UUID = Field(foreign_key="workspaces.id", ondelete="CASCADE")
    value: str = Field(max_length=320)
    kind: ExclusionKind = Field(sa_type=enum_type(ExclusionKind))
    created_by_id: uuid.UUID = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    created_at: datetime = Field(default_factory=now, sa_type=UtcDateTime)
