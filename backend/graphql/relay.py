"""Relay plumbing: opaque global ids, the Node interface and cursor connections."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import strawberry

from backend.kit.pagination import Page, PageRequest, clamp_first

T = TypeVar("T")


def to_global_id(type_name: str, row_id: uuid.UUID) -> strawberry.ID:
    return strawberry.ID(base64.urlsafe_b64encode(f"{type_name}:{row_id}".encode()).decode())


def parse_global_id(value: str) -> tuple[str, uuid.UUID] | None:
    try:
        type_name, _, raw = base64.urlsafe_b64decode(value.encode()).decode().partition(":")
        return type_name, uuid.UUID(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def id_of(value: str | None, type_name: str) -> uuid.UUID | None:
    """The row id behind a global id of the given type, or None (unknown ids are just not found)."""
    if value is None:
        return None
    parsed = parse_global_id(value)
    if parsed is None or parsed[0] != type_name:
        return None
    return parsed[1]


@strawberry.interface(description="An object with a global id (Relay).")
class Node:
    @strawberry.field
    def id(self) -> strawberry.ID:
        raise NotImplementedError


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type
class Edge(Generic[T]):
    node: T
    cursor: str


@strawberry.type
class Connection(Generic[T]):
    edges: list[Edge[T]]
    page_info: PageInfo
    counter: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field
    async def total_count(self) -> int:
        return await self.counter()


def page_info(page: Page[Any]) -> PageInfo:
    return PageInfo(
        has_next_page=page.has_next,
        has_previous_page=page.has_previous,
        start_cursor=page.cursors[0] if page.cursors else None,
        end_cursor=page.cursors[-1] if page.cursors else None,
    )


def edges(nodes: Sequence[T], cursors: Sequence[str]) -> list[Edge[T]]:
    return [Edge(node=n, cursor=c) for n, c in zip(nodes, cursors, strict=True)]


C = TypeVar("C", bound=Connection)  # type: ignore[type-arg]


def connection(
    cls: type[C], nodes: Sequence[object], page: Page[Any], counter: Callable[[], Awaitable[int]]
) -> C:
    return cls(edges=edges(nodes, page.cursors), page_info=page_info(page), counter=counter)


def page_request(first: int | None, after: str | None, default: int, maximum: int) -> PageRequest:
    return PageRequest(clamp_first(default if first is None else first, maximum), after)
