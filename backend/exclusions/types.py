import datetime

import strawberry

from backend.auth import loaders as auth_loaders
from backend.exclusions import tables
from backend.graphql.context import Info
from backend.graphql.relay import Connection, Node, to_global_id
from backend.workspaces.types import User

ExclusionKind = tables.ExclusionKind
strawberry.enum(ExclusionKind)


@strawberry.type
class Exclusion(Node):
    row: strawberry.Private[tables.Exclusion]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return to_global_id("Exclusion", self.row.id)

    @strawberry.field(description='"bob@example.com" or "example.com"')
    def value(self) -> str:
        return self.row.value

    @strawberry.field
    def kind(self) -> ExclusionKind:
        return self.row.kind

    @strawberry.field
    async def created_by(self, info: Info) -> User:
        row = await auth_loaders.user(info).load(self.row.created_by_id)
        if row is None:
            raise LookupError(f"creator of exclusion {self.row.id} is missing")
        return User(row=row)

    @strawberry.field
    def created_at(self) -> datetime.datetime:
        return self.row.created_at


@strawberry.type
class ExclusionConnection(Connection[Exclusion]):
    pass
