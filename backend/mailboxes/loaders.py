"""Per-operation loaders of mailboxes and what they own."""

from __future__ import annotations

import uuid

from strawberry.dataloader import DataLoader

from backend.graphql.loaders import LoaderScope, batch, loader, once
from backend.mailboxes import queries
from backend.mailboxes.tables import Mailbox, SyncErrorEntry


@loader
def mailbox(scope: LoaderScope) -> DataLoader[uuid.UUID, Mailbox | None]:
    return batch(lambda ids: queries.mailboxes_by_ids(scope.session, scope.workspace_id, ids))


@loader
def mailboxes_of_owner(scope: LoaderScope) -> DataLoader[uuid.UUID, list[Mailbox]]:
    return batch(
        lambda ids: queries.mailboxes_by_owner(scope.session, scope.workspace_id, ids), list
    )


@loader
def last_error(scope: LoaderScope) -> DataLoader[uuid.UUID, SyncErrorEntry | None]:
    return batch(lambda ids: queries.latest_errors(scope.session, ids))


@once
async def own_addresses(scope: LoaderScope) -> dict[str, uuid.UUID]:
    """Every address of the workspace's users (R1), mapped to its user."""
    return await queries.cached_own_addresses(scope.session, scope.workspace_id)
