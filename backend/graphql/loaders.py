"""Per-operation DataLoaders: every nested field batches its SQL, whatever the page size.

Each domain declares its loaders in its own `loaders.py` with `@loader`; an operation makes
each loader on first use and keeps it until the operation ends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.dataloader import DataLoader

if TYPE_CHECKING:
    from backend.auth.service import Viewer
    from backend.graphql.context import Info

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


@dataclass(frozen=True)
class LoaderScope:
    session: AsyncSession
    # Without a viewer no resolver runs past authentication; a nil workspace matches nothing.
    workspace_id: uuid.UUID
    viewer: Viewer | None


def batch(
    fetch: Callable[[list[K]], Awaitable[dict[K, V]]], default: Callable[[], Any] = lambda: None
) -> DataLoader[K, Any]:
    """A DataLoader over a query that answers a dict by key; missing keys get `default()`."""

    async def load(keys: list[K]) -> list[Any]:
        found = await fetch(keys)
        return [found.get(k, default()) for k in keys]

    return DataLoader(load_fn=load)


class Loaders:
    def __init__(
        self, session: AsyncSession, workspace_id: uuid.UUID | None, viewer: Viewer | None
    ) -> None:
        self.scope = LoaderScope(session, workspace_id or uuid.UUID(int=0), viewer)
        self._made: dict[object, Any] = {}

    def get(self, make: Callable[[LoaderScope], T]) -> T:
        if make not in self._made:
            self._made[make] = make(self.scope)
        made: T = self._made[make]
        return made


def loader(make: Callable[[LoaderScope], T]) -> Callable[[Info], T]:
    """Declare a per-operation loader: `@loader def emails(scope) -> DataLoader[...]`, used as
    `emails(info).load(id)`."""

    def get(info: Info) -> T:
        return info.context.loaders.get(make)

    get.__name__ = make.__name__
    get.__doc__ = make.__doc__
    return get


def once(make: Callable[[LoaderScope], Awaitable[T]]) -> Callable[[Info], Awaitable[T]]:
    """A value loaded once per operation; concurrent resolvers share the one in-flight query."""

    def start(scope: LoaderScope) -> asyncio.Future[T]:
        return asyncio.ensure_future(make(scope))

    get_future = loader(start)

    async def get(info: Info) -> T:
        return await asyncio.shield(get_future(info))

    get.__name__ = make.__name__
    return get
