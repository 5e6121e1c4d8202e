"""The sync side's `CredentialStore`: what a provider must not lose (a rotated Microsoft
refresh token) is written the moment the provider hands it over, in a unit of work of its
own, so neither a crash nor a failed or timed-out pass loses it."""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from backend.mailboxes.service import read_credentials, write_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus

if TYPE_CHECKING:
    from backend.runtime import Work


class UnitOfWork(Protocol):
    def __call__(self, *, read_only: bool = False) -> AbstractAsyncContextManager[Work]: ...


class MailboxCredentialStore:
    def __init__(
        self,
        unit_of_work: UnitOfWork,
        secret: bytes,
        mailbox_id: uuid.UUID,
    ) -> None:
        self.unit_of_work = unit_of_work
        self.secret = secret
        self.mailbox_id = mailbox_id
        self.stored = 0
        # The sealed credentials this store last wrote, for writers that must tell their own
        # rotation from a reconnect.
        self.last_sealed: str | None = None

    async def save(self, credentials: dict[str, Any]) -> None:
        async with self.unit_of_work() as work:
            mailbox = await work.session.get(Mailbox, self.mailbox_id)
            # A mailbox disconnected meanwhile keeps no credentials.
            if mailbox is None or mailbox.status == MailboxStatus.DISCONNECTED:
                return
            write_credentials(self.secret, mailbox, credentials)
            work.session.add(mailbox)
            sealed = mailbox.credentials_encrypted
        self.last_sealed = sealed
        self.stored += 1

    async def load(self) -> dict[str, Any] | None:
        """The stored credentials, which another process may have refreshed."""
        async with self.unit_of_work(read_only=True) as work:
            mailbox = await work.session.get(Mailbox, self.mailbox_id)
            work.discard()
            if mailbox is None or mailbox.credentials_encrypted is None:
                return None
            return read_credentials(self.secret, mailbox)
