"""Per-operation DataLoaders: every nested field batches its SQL, whatever the page size.

Each domain declares its loaders in its own `loaders.py` with `@loader`; an operation makes
each loader on first use and keeps it until the operation ends."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.dataloader import DataLoader

if TYPE_CHECKING:
    from backend.auth.service import Viewer
    from backend.graphql.context import Info

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")
R = TypeVar("R")


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


class Once(Generic[T]):
    """A value loaded once per operation; concurrent resolvers share the one in-flight query.
    `await x(info)` waits for it; `x.future(info)` is the shared future, for `then`."""

    def __init__(self, make: Callable[[LoaderScope], Awaitable[T]]) -> None:
        def start(scope: LoaderScope) -> asyncio.Future[T]:
            return asyncio.ensure_future(make(scope))

        self.future = loader(start)
        self.__name__ = make.__name__

    async def __call__(self, info: Info) -> T:
        return await asyncio.shield(self.future(info))


def once(make: Callable[[LoaderScope], Awaitable[T]]) -> Once[T]:
    return Once(make)


def then(future: Awaitable[T], use: Callable[[T], R]) -> Any:
    """`use(value)` at once when the loader already holds the value (a done future), else an
    awaitable of it, which graphql-core awaits. A field whose loaders were filled ahead (see
    `timeline.types.prefetch_page`) then resolves without a coroutine, a task and their
    callbacks: per field that machinery cost more than the field (docs/performance.md).
    Resolvers using it are plain `def`s typed with their GraphQL type."""
    if isinstance(future, asyncio.Future) and future.done():
        return use(future.result())

    async def later() -> Any:
        result: Any = use(await future)
        # `use` may chain another `then` (a loader keyed by what this one answered).
        return await result if inspect.isawaitable(result) else result

    return later()
