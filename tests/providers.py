"""A provider double: an in-memory mailbox per address, reached through the real interface."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from backend.providers import registry
from backend.providers.base import (
    ChangeSet,
    FetchedMessage,
    MailboxAccount,
    MailProvider,
    MessageRef,
    Provider,
    ProviderError,
    SentMessage,
)
from backend.settings import Settings


class FakeMailStore:
    def __init__(self) -> None:
        self.messages: dict[str, list[tuple[str, bytes, str | None]]] = defaultdict(list)
        self.failures: dict[str, ProviderError] = {}
        self.marked: dict[str, list[str]] = {}

    def deliver(self, address: str, raw: bytes, thread_id: str | None = None) -> str:
        box = self.messages[address]
        provider_id = f"{address}#{len(box) + 1}"
        box.append((provider_id, raw, thread_id))
        return provider_id

    def fail_with(self, address: str, error: ProviderError) -> None:
        self.failures[address] = error


class FakeProvider(MailProvider):
    def __init__(self, store: FakeMailStore, mailbox: MailboxAccount) -> None:
        self.store = store
        self.address = mailbox.email_address

    def _check(self) -> None:
        if self.address in self.store.failures:
            raise self.store.failures[self.address]

    async def own_addresses(self) -> list[str]:
        return [self.address]

    async def list_changes(self, cursor: dict[str, Any] | None, since: datetime) -> ChangeSet:
        self._check()
        position = int((cursor or {}).get("position", 0))
        box = self.store.messages[self.address]
        refs = [MessageRef(pid, tid) for pid, _, tid in box[position:]]
        return ChangeSet(refs=refs, cursor={"position": len(box)})

    async def fetch(self, refs: Sequence[MessageRef]) -> list[FetchedMessage | ProviderError]:
        self._check()
        by_id = {pid: (raw, tid) for pid, raw, tid in self.store.messages[self.address]}
        return [
            FetchedMessage(ref=r, raw=by_id[r.provider_id][0], thread_id=by_id[r.provider_id][1])
            for r in refs
        ]

    async def send(self, raw: bytes, thread_id: str | None = None) -> SentMessage:
        return SentMessage(self.store.deliver(self.address, raw, thread_id), thread_id)

    async def mark(self, provider_ids: Sequence[str], label: str) -> None:
        self.store.marked.setdefault(label, []).extend(provider_ids)


@contextmanager
def fake_provider(provider: Provider = Provider.GMAIL) -> Iterator[FakeMailStore]:
    store = FakeMailStore()
    previous = registry.factory_for(provider)

    def build(
        mailbox: MailboxAccount, credentials: dict[str, Any], settings: Settings
    ) -> MailProvider:
        return FakeProvider(store, mailbox)

    registry.register(provider, build)
    try:
        yield store
    finally:
        if previous is None:
            registry.unregister(provider)
        else:
            registry.register(provider, previous)
