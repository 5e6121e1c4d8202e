"""Per-request context and the per-operation scope (session, loaders, after-commit effects)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.types import Info as StrawberryInfo

from backend.graphql.loaders import Loaders
from backend.kit.effects import AfterCommit

if TYPE_CHECKING:
    from backend.auth.service import Viewer
    from backend.runtime import Runtime, Work


@dataclass
class OperationScope:
    """One GraphQL operation's unit of work; a subscription gets a fresh one per event."""

    session: AsyncSession
    loaders: Loaders
    effects: AfterCommit = field(default_factory=AfterCommit)


# A websocket connection shares one Context between concurrent operations, so the
# operation's own state lives in a context variable set by the UnitOfWork extension.
current_scope: ContextVar[OperationScope | None] = ContextVar("current_scope", default=None)


class Context:
    def __init__(self, runtime: Runtime, viewer: Viewer | None, request: Any = None) -> None:
        self.runtime = runtime
        self.viewer = viewer
        self.request = request
        self.connection_params: dict[str, Any] | None = None

    @property
    def scope(self) -> OperationScope:
        scope = current_scope.get()
        if scope is None:
            raise RuntimeError("no unit of work is open for this operation")
        return scope

    @property
    def session(self) -> AsyncSession:
        return self.scope.session

    @property
    def loaders(self) -> Loaders:
        return self.scope.loaders

    def open_scope(self, work: Work) -> OperationScope:
        workspace_id = self.viewer.workspace_id if self.viewer else None
        return OperationScope(
            session=work.session,
            loaders=Loaders(work.session, workspace_id, self.viewer),
            effects=work.effects,
        )


Info = StrawberryInfo[Context, None]
