"""Per-operation DataLoaders: every nested field batches its SQL, whatever the page size."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.dataloader import DataLoader

from backend.contacts import queries as contact_queries
from backend.contacts.tables import Contact
from backend.mail import queries as mail_queries
from backend.mail.tables import Email, Participant, Thread
from backend.mailboxes import queries as mailbox_queries
from backend.mailboxes.tables import Mailbox, SyncErrorEntry
from backend.workspaces import queries as workspace_queries
from backend.workspaces.tables import ContactMatching, User

if TYPE_CHECKING:
    from backend.auth.service import Viewer

K = TypeVar("K")
V = TypeVar("V")


def _loader(
    fetch: Callable[[list[K]], Awaitable[dict[K, V]]], default: Callable[[], Any] = lambda: None
) -> DataLoader[K, Any]:
    async def load(keys: list[K]) -> list[Any]:
        found = await fetch(keys)
        return [found.get(k, default()) for k in keys]

    return DataLoader(load_fn=load)


class Loaders:
    def __init__(
        self, session: AsyncSession, workspace_id: uuid.UUID | None, viewer: Viewer | None
    ) -> None:
        # Without a viewer no resolver runs past authentication; a nil workspace matches nothing.
        ws = workspace_id or uuid.UUID(int=0)
        s = session
        self.user: DataLoader[uuid.UUID, User | None] = _loader(
            lambda ids: workspace_queries.users_by_ids(s, ws, ids)
        )
        self.contact: DataLoader[uuid.UUID, Contact | None] = _loader(
            lambda ids: contact_queries.contacts_by_ids(s, ws, ids)
        )
        self.contact_addresses: DataLoader[uuid.UUID, list[str]] = _loader(
            lambda ids: contact_queries.addresses_by_contact(s, ids), list
        )
        self.mailbox: DataLoader[uuid.UUID, Mailbox | None] = _loader(
            lambda ids: mailbox_queries.mailboxes_by_ids(s, ws, ids)
        )
        self.mailboxes_of_owner: DataLoader[uuid.UUID, list[Mailbox]] = _loader(
            lambda ids: mailbox_queries.mailboxes_by_owner(s, ws, ids), list
        )
        self.last_error: DataLoader[uuid.UUID, SyncErrorEntry | None] = _loader(
            lambda ids: mailbox_queries.latest_errors(s, ids)
        )
        self.thread: DataLoader[uuid.UUID, Thread | None] = _loader(
            lambda ids: mail_queries.threads_by_ids(s, ws, ids)
        )
        self.email: DataLoader[uuid.UUID, Email | None] = _loader(
            lambda ids: mail_queries.emails_by_ids(s, ws, ids)
        )
        self.participants: DataLoader[uuid.UUID, list[Participant]] = _loader(
            lambda ids: mail_queries.participants_by_email(s, ids), list
        )
        self.email_contact_ids: DataLoader[uuid.UUID, list[uuid.UUID]] = _loader(
            lambda ids: mail_queries.contact_ids_by_email(s, ids), list
        )
        self.thread_email_ids: DataLoader[uuid.UUID, list[uuid.UUID]] = _loader(
            lambda ids: mail_queries.thread_email_ids(s, ids), list
        )
        self.thread_subject_viewers: DataLoader[
            uuid.UUID, list[tuple[str | None, uuid.UUID | None]]
        ] = _loader(lambda ids: mail_queries.thread_subject_viewers(s, ids), list)
        primary_only = viewer is not None and (
            viewer.workspace.contact_matching == ContactMatching.PRIMARY_EMAIL_ONLY
        )
        self.contact_for_address: DataLoader[str, Contact | None] = _loader(
            lambda addresses: contact_queries.contacts_for_addresses(
                s, ws, addresses, primary_only=primary_only
            )
        )
        self._own_addresses: asyncio.Future[dict[str, uuid.UUID]] | None = None
        self._session = session
        self._workspace_id = ws

    async def own_addresses(self) -> dict[str, uuid.UUID]:
        """Loaded once per operation; concurrent resolvers share the one in-flight query."""
        if self._own_addresses is None:
            self._own_addresses = asyncio.ensure_future(
                workspace_queries.own_addresses(self._session, self._workspace_id)
            )
        return await asyncio.shield(self._own_addresses)

    async def contacts(self, ids: Sequence[uuid.UUID]) -> list[Contact]:
        loaded = await self.contact.load_many(list(ids))
        return [c for c in loaded if c is not None]
