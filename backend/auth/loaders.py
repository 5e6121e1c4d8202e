"""Per-operation loaders of users."""

from __future__ import annotations

import uuid

from strawberry.dataloader import DataLoader

from backend.auth import queries
from backend.auth.tables import User
from backend.graphql.loaders import LoaderScope, batch, loader


@loader
def user(scope: LoaderScope) -> DataLoader[uuid.UUID, User | None]:
    return batch(lambda ids: queries.users_by_ids(scope.session, scope.workspace_id, ids))
