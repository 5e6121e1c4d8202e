"""Keyset pagination: cursors name a row's sort key, so pages stay stable while mail arrives."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from backend.kit.errors import ErrorCode, ServiceError

T = TypeVar("T")


@dataclass(frozen=True)
class PageRequest:
    first: int
    after: str | None


@dataclass
class Page(Generic[T]):
    items: list[T]
    cursors: list[str]
    has_next: bool
    has_previous: bool


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"u": value.hex}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if "t" in value:
            return datetime.fromisoformat(value["t"])
        if "u" in value:
            return uuid.UUID(value["u"])
    return value


def encode_cursor(key: Sequence[Any]) -> str:
    raw = json.dumps([_encode_value(v) for v in key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, width: int) -> list[Any]:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != width:
            raise ValueError
        return [_decode_value(v) for v in values]
    except (ValueError, TypeError, KeyError) as exc:
        raise ServiceError(
            ErrorCode.INVALID_CURSOR, "The `after` cursor is not valid.", ["after"]
        ) from exc


def clamp_first(first: int, maximum: int) -> int:
    if first < 0:
        raise ServiceError(ErrorCode.INVALID_ARGUMENT, "`first` must not be negative.", ["first"])
    return min(first, maximum)


async def keyset_page(
    session: AsyncSession,
    stmt: sa.Select[Any],
    order_by: Sequence[Any],
    key_of: Callable[[Any], Sequence[Any]],
    request: PageRequest,
    *,
    descending: bool,
    scalars: bool = True,
) -> Page[Any]:
    """One page of `stmt` ordered by `order_by` (all one direction), after `request.after`."""
    if request.after is not None:
        values = decode_cursor(request.after, len(order_by))
        left = sa.tuple_(*order_by)
        right = sa.tuple_(
            *[sa.literal(v, type_=c.type) for v, c in zip(values, order_by, strict=True)]
        )
        stmt = stmt.where(left < right if descending else left > right)
    ordering = [c.desc() if descending else c.asc() for c in order_by]
    stmt = stmt.order_by(*ordering).limit(request.first + 1)
    result = await session.execute(stmt)
    rows = list(result.scalars().all() if scalars else result.all())
    has_next = len(rows) > request.first
    rows = rows[: request.first]
    return Page(
        items=rows,
        cursors=[encode_cursor(key_of(r)) for r in rows],
        has_next=has_next,
        has_previous=request.after is not None,
    )


async def count(session: AsyncSession, stmt: sa.Select[Any]) -> int:
    total = await session.scalar(
        sa.select(sa.func.count()).select_from(stmt.order_by(None).subquery())
    )
    return int(total or 0)
