"""Per-operation loaders of contacts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from strawberry.dataloader import DataLoader

from backend.auth.tables import ContactMatching
from backend.contacts import queries
from backend.contacts.tables import Contact
from backend.graphql.context import Info
from backend.graphql.loaders import LoaderScope, batch, loader


@loader
def contact(scope: LoaderScope) -> DataLoader[uuid.UUID, Contact | None]:
    return batch(lambda ids: queries.contacts_by_ids(scope.session, scope.workspace_id, ids))


@loader
def contact_addresses(scope: LoaderScope) -> DataLoader[uuid.UUID, list[str]]:
    return batch(lambda ids: queries.addresses_by_contact(scope.session, ids), list)


@loader
def contact_for_address(scope: LoaderScope) -> DataLoader[str, Contact | None]:
    primary_only = scope.viewer is not None and (
        scope.viewer.workspace.contact_matching == ContactMatching.PRIMARY_EMAIL_ONLY
    )
    return batch(
        lambda addresses: queries.contacts_for_addresses(
            scope.session, scope.workspace_id, addresses, primary_only=primary_only
        )
    )


async def contacts(info: Info, ids: Sequence[uuid.UUID]) -> list[Contact]:
    loaded = await contact(info).load_many(list(ids))
    return [c for c in loaded if c is not None]
