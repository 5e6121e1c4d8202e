"""The product inside the providers' documented limits, through the real client libraries
against the sandboxes, which enforce those limits (docs/providers.md, "Limits")."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

from sqlmodel import col, select

from backend.kit import clock
from backend.mail.tables import Email
from backend.mailboxes.service import read_credentials
from backend.mailboxes.tables import MailboxStatus
from backend.providers.base import MailboxAccount
from backend.providers.gmail.provider import GmailProvider
from backend.runtime import Runtime
from backend.sync.jobs import run_pass
from tests.client import GQL
from tests.factories import Factory, raw_message, unique
from tests.sandbox import SandboxServer
from tests.sync_helpers import reload_mailbox
from tests.test_gmail import connected

# The pass fetches in slices of this many refs (sync.service.FETCH_BATCH).
PASS_SLICE = 50


def gmail_account(google: SandboxServer, messages: int) -> str:
    address = f"{unique('big')}@gmail.sandbox.test"
    google.google.ensure_account(address)
    for i in range(messages):
        google.google.deliver(
            address, raw_message(f"c{i % 40}@client.test", [address], f"M{i}", f"body {i}")
        )
    return address


async def test_gmail_fetch_paces_a_large_first_sync_within_the_per_user_quota(
    google: SandboxServer, runtime: Runtime
) -> None:
    """Gmail's per-user quota is units per minute (messages.get: 5) and its quota errors carry
    no Retry-After. A first sync of thousands of messages runs into it; the fetch backs off
    (exponential, with jitter, shared per mailbox), shrinks its batches and carries on until
    every message is read once. The sandbox's window is 3 s here instead of 60, so this
    takes seconds; the rule is the same. Before: three retries within 1.5 s, then the pass
    failed, and the next one listed and fetched everything again."""
    total = 2000
    address = gmail_account(google, total)
    # 450 messages.get per 3 s: the first burst of batches uses it up.
    google.google.set_quota(address, 2250, window_seconds=3)
    token = google.google.mint_token(address)
    account = MailboxAccount(id=str(uuid.uuid4()), email_address=address)
    provider = GmailProvider(account, {"access_token": token}, runtime.settings)
    try:
        changes = await provider.list_changes(None, clock.now() - timedelta(days=1))
        assert len(changes.refs) == total
        read: list[str] = []
        for start in range(0, total, PASS_SLICE):
            fetched = await provider.fetch(changes.refs[start : start + PASS_SLICE])
            read.extend(item.ref.provider_id for item in fetched)  # type: ignore[union-attr]
    finally:
        await provider.close()
    assert sorted(read) == sorted(ref.provider_id for ref in changes.refs)
    assert len(set(read)) == total
    sandbox_account = google.google.account(address)
    assert sandbox_account is not None and sandbox_account.rate_limited > 0
    assert provider.client.pace.batch_size <= 50


async def test_a_quota_bound_first_gmail_sync_files_every_message_once(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    """A first sync of 2,000 messages against a quota another client of the same user has
    just used up: the passes pace themselves by the 429s and, pass after pass if need be,
    file every message exactly once (R7)."""
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    total = 2000
    for i in range(total):
        google.google.deliver(
            address, raw_message(f"c{i % 40}@client.test", [address], f"M{i}", f"body {i}")
        )
    for i in range(40):
        await factory.contact(owner, f"c{i}@client.test", f"C{i}")
    google.google.set_quota(address, 1000, window_seconds=1)
    google.google.spend_quota(address, 1000)  # another app of the user, just now
    deadline = time.monotonic() + 600
    while True:
        await run_pass(runtime, mailbox_id)
        mailbox = await reload_mailbox(runtime, mailbox_id)
        if mailbox.status == MailboxStatus.ACTIVE or time.monotonic() > deadline:
            break
    async with runtime.db.sessionmaker() as session:
        ids = list(
            await session.scalars(
                select(Email.message_id).where(col(Email.workspace_id) == owner.workspace.id)
            )
        )
    assert mailbox.status == MailboxStatus.ACTIVE
    assert len(ids) == total and len(set(ids)) == total
    sandbox_account = google.google.account(address)
    assert sandbox_account is not None and sandbox_account.rate_limited > 0
    assert read_credentials(runtime.settings.secret, mailbox)
