"""The transactional outbox: the jobs and events of a unit of work, written as rows in the
transaction that makes them true, so a commit can never lose them to a Redis outage.

Right after the commit the unit of work releases them to Redis and deletes their rows; rows
still here afterwards (Redis was down, the process died between the two) are relayed by
the worker (`worker/relay.py`), at least once and in the order they were written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Field, SQLModel, col, select

from backend.db import UtcDateTime
from backend.kit.effects import Effect, EffectKind


def _wall_clock() -> datetime:
    # The real time, not kit.clock's: rows are aged against other processes' clocks.
    return datetime.now(UTC)


class OutboxEntry(SQLModel, table=True):
    """A job request or event committed but not yet known to be in Redis."""

    __tablename__ = "outbox"

    # The effect's id: an event's id on the stream, so a relayed copy is recognised.
    id: str = Field(primary_key=True, max_length=32)
    created_at: datetime = Field(default_factory=_wall_clock, sa_type=UtcDateTime, index=True)
    # Order within its transaction: release order is (created_at, position).
    position: int = 0
    kind: str = Field(max_length=8)
    target: str = Field(max_length=64)
    event: str | None = Field(default=None, sa_type=sa.Text)


def entries_for(effects: Sequence[Effect]) -> list[OutboxEntry]:
    created_at = _wall_clock()
    return [
        OutboxEntry(
            id=effect.id,
            created_at=created_at,
            position=position,
            kind=effect.kind,
            target=effect.target,
            event=None if effect.event is None else json.dumps(effect.event, default=str),
        )
        for position, effect in enumerate(effects)
    ]


def effect_of(entry: OutboxEntry) -> Effect:
    event: dict[str, Any] | None = None if entry.event is None else json.loads(entry.event)
    return Effect(cast("EffectKind", entry.kind), entry.target, event, entry.id)


async def due(session: AsyncSession, older_than: float, limit: int) -> list[Effect]:
    """The oldest rows written at least `older_than` seconds ago (younger ones are still
    being released by the unit of work that wrote them)."""
    cutoff = _wall_clock() - timedelta(seconds=older_than)
    rows = await session.scalars(
        select(OutboxEntry)
        .where(col(OutboxEntry.created_at) <= cutoff)
        .order_by(col(OutboxEntry.created_at), col(OutboxEntry.position))
        .limit(limit)
    )
    return [effect_of(row) for row in rows]


async def forget(session: AsyncSession, ids: Sequence[str]) -> None:
    if ids:
        await session.execute(sa.delete(OutboxEntry).where(col(OutboxEntry.id).in_(list(ids))))
