"""The product inside the providers' documented limits, through the real client libraries
against the sandboxes, which enforce those limits (docs/providers.md, "Limits")."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import col, select

from backend.kit import clock
from backend.mail.tables import Email
from backend.mailboxes.service import read_credentials, write_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus, SyncErrorEntry
from backend.providers.base import (
    AccessDenied,
    AccessRevoked,
    FetchedMessage,
    MailboxAccount,
    ProviderConfigurationError,
    ProviderError,
    TransientProviderError,
)
from backend.providers.gmail.provider import GmailProvider
from backend.providers.microsoft.provider import MicrosoftProvider
from backend.providers.pacing import Backoff
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from backend.sync.jobs import run_pass
from backend.sync.service import due_mailboxes
from tests.client import GQL
from tests.factories import Factory, raw_message, unique
from tests.sandbox import SandboxServer
from tests.sync_helpers import error_codes, reload_mailbox
from tests.test_gmail import connected
from tests.worker import drain

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
    # 750 messages.get per 3 s.
    google.google.set_quota(address, 3750, window_seconds=3)
    token = google.google.mint_token(address)
    account = MailboxAccount(id=str(uuid.uuid4()), email_address=address)
    provider = GmailProvider(account, {"access_token": token}, runtime.settings)
    try:
        changes = await provider.list_changes(None, clock.now() - timedelta(days=1))
        assert len(changes.refs) == total
        # Another app of the user has just used the window up: the first batch is refused
        # however fast or slow this machine is.
        google.google.spend_quota(address, 3750)
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


def outlook_account(microsoft: SandboxServer, messages: int) -> tuple[str, dict[str, Any]]:
    """An Outlook account with mail, and credentials for it as the product stores them."""
    address = f"{unique('ol')}@outlook.sandbox.test"
    microsoft.microsoft.ensure_account(address)
    for i in range(messages):
        microsoft.microsoft.deliver(address, raw_message("c@client.test", [address], f"M{i}"))
    token = microsoft.microsoft.mint_token(address)
    grant = next(g for g in microsoft.microsoft.grants.values() if g.email == address)
    return address, {
        "access_token": token,
        "refresh_token": grant.refresh_token,
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }


def outlook(
    runtime: Runtime, mailbox_id: str, address: str, credentials: dict[str, Any]
) -> MicrosoftProvider:
    account = MailboxAccount(id=mailbox_id, email_address=address)
    return MicrosoftProvider(account, dict(credentials), runtime.settings)


async def test_graph_calls_stay_within_four_per_mailbox_across_providers(
    microsoft: SandboxServer, runtime: Runtime
) -> None:
    """Outlook allows an app 4 concurrent requests per mailbox (MailboxConcurrency, Graph
    "throttling limits"). Two providers of one mailbox in one worker (a pass and a send job,
    say) share the limit: the sandbox never sees a fifth request, so never throttles. Before:
    4 per provider instance, 8 at once, 429s."""
    address, credentials = outlook_account(microsoft, 24)
    account = microsoft.microsoft.account(address)
    assert account is not None
    account.latency = 0.05  # requests take time, as Graph's do, so they overlap
    mailbox_id = str(uuid.uuid4())
    first = outlook(runtime, mailbox_id, address, credentials)
    second = outlook(runtime, mailbox_id, address, credentials)
    try:
        since = clock.now() - timedelta(days=1)
        changes = await first.list_changes(None, since)
        await second.list_changes(None, since)
        assert len(changes.refs) == 24
        both = await asyncio.gather(first.fetch(changes.refs), second.fetch(changes.refs))
    finally:
        await first.close()
        await second.close()
    assert all(isinstance(item, FetchedMessage) for fetched in both for item in fetched)
    assert account.most_in_flight == 4
    assert account.throttled == 0


async def test_a_graph_429_during_a_fetch_is_waited_out(
    microsoft: SandboxServer, runtime: Runtime
) -> None:
    """Graph's throttling guidance: on 429, wait the Retry-After and try again. A message
    throttled three times in a row is still read in the same fetch (before: two retries,
    then the whole pass failed)."""
    address, credentials = outlook_account(microsoft, 3)
    provider = outlook(runtime, str(uuid.uuid4()), address, credentials)
    try:
        changes = await provider.list_changes(None, clock.now() - timedelta(days=1))
        target = changes.refs[0].provider_id
        fault = microsoft.microsoft.faults.add(
            Fault(status=429, retry_after=1, account=address, path=f"{target}/\\$value", times=3)
        )
        fetched = await provider.fetch(changes.refs)
    finally:
        await provider.close()
    assert fault.hits == 3
    assert all(isinstance(item, FetchedMessage) for item in fetched)


@pytest.mark.parametrize(
    ("reason", "message", "kind", "code"),
    [
        # The user must sign in again: reconnect.
        (
            "invalid_grant",
            "AADSTS70008: The refresh token has expired.",
            AccessRevoked,
            "ACCESS_REVOKED",
        ),
        (
            "invalid_grant",
            "AADSTS700082: Expired due to inactivity.",
            AccessRevoked,
            "ACCESS_REVOKED",
        ),
        ("interaction_required", "AADSTS50076: MFA required.", AccessRevoked, "ACCESS_REVOKED"),
        (
            "invalid_grant",
            "AADSTS65001: The user has not consented.",
            AccessRevoked,
            "ACCESS_REVOKED",
        ),
        # The user or their administrator blocks access.
        (
            "invalid_grant",
            "AADSTS53003: Blocked by Conditional Access.",
            AccessDenied,
            "ACCESS_DENIED",
        ),
        (
            "invalid_grant",
            "AADSTS50057: The user account is disabled.",
            AccessDenied,
            "ACCESS_DENIED",
        ),
        # Nobody's fault: retried.
        (
            "temporarily_unavailable",
            "The server is temporarily too busy.",
            TransientProviderError,
            "PROVIDER_UNAVAILABLE",
        ),
        ("server_error", "Internal error.", TransientProviderError, "PROVIDER_UNAVAILABLE"),
        # The operator's: mailsync's app registration.
        (
            "invalid_client",
            "AADSTS7000222: The client secret keys are expired.",
            ProviderConfigurationError,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.",
            ProviderConfigurationError,
            "PROVIDER_UNAVAILABLE",
        ),
        (
            "unauthorized_client",
            "AADSTS700016: Application not found in the directory.",
            ProviderConfigurationError,
            "PROVIDER_UNAVAILABLE",
        ),
    ],
)
async def test_identity_platform_errors_are_mapped_by_who_can_fix_them(
    microsoft: SandboxServer,
    runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
    reason: str,
    message: str,
    kind: type[ProviderError],
    code: str,
) -> None:
    """ "Microsoft Entra authentication and authorization error codes" (learn.microsoft.com/
    entra/identity-platform/reference-error-codes): `invalid_grant` and
    `interaction_required` ask for a new sign-in; `temporarily_unavailable` is to be retried;
    `invalid_client` ("the application administrator updates the credentials") and
    `unauthorized_client` are the app's configuration. Before: everything but 5xx and 429
    was the user's (reconnect)."""
    address, credentials = outlook_account(microsoft, 0)
    credentials["expires_at"] = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    microsoft.microsoft.faults.add(
        Fault(
            status=400 if reason != "server_error" else 500,
            reason=reason,
            message=message,
            account=address,
            path="/token",
            times=1,
        )
    )
    provider = outlook(runtime, str(uuid.uuid4()), address, credentials)
    caplog.set_level(logging.ERROR, logger="backend.providers.microsoft.tokens")
    try:
        with pytest.raises(ProviderError) as failed:
            await provider.prepare(60)
    finally:
        await provider.close()
    assert type(failed.value) is kind and failed.value.code == code
    blamed_operator = any("app registration" in r.getMessage() for r in caplog.records)
    assert blamed_operator == (kind is ProviderConfigurationError)


async def test_an_expired_app_secret_is_the_operators_problem_not_the_users(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    """An expired client secret refuses every refresh with `invalid_client`: the mailbox
    keeps retrying as PROVIDER_UNAVAILABLE (its error naming the configuration) and is not
    sent to "reconnect", which would not help."""
    from tests.test_microsoft import connected as connected_outlook

    owner, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
    microsoft.microsoft.expire_access_tokens(address)
    async with runtime.unit_of_work() as work:
        row = await work.session.get(Mailbox, mailbox_id)
        assert row is not None
        lapsed = read_credentials(runtime.settings.secret, row)
        lapsed["expires_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        write_credentials(runtime.settings.secret, row, lapsed)
        work.session.add(row)
    microsoft.microsoft.faults.add(
        Fault(
            status=401,
            reason="invalid_client",
            message="AADSTS7000222: The provided client secret keys are expired.",
            account=address,
            path="/token",
        )
    )
    await run_pass(runtime, mailbox_id)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.ERROR
    assert await error_codes(runtime, mailbox_id) == ["PROVIDER_UNAVAILABLE"]
    # What the workspace's administrators see: the mailbox failing, for a reason that is
    # not the user's; the error's detail names the configuration for the operator.
    shown = await gql(
        "{ connectionStatuses { health mailboxes { status lastError { code } } } }",
        {},
        token=owner.token,
    )
    (status,) = shown["connectionStatuses"]
    assert status["health"] == "ERROR"
    assert [m["lastError"] for m in status["mailboxes"]] == [{"code": "PROVIDER_UNAVAILABLE"}]
    async with runtime.db.sessionmaker() as session:
        (detail,) = await session.scalars(
            select(SyncErrorEntry.detail).where(col(SyncErrorEntry.mailbox_id) == mailbox_id)
        )
    assert detail is not None and detail.startswith("configuration:") and "7000222" in detail


class MemoryStore:
    """A credential store as the sync side's, in memory: what was saved, what is stored."""

    def __init__(self, stored: dict[str, Any] | None = None) -> None:
        self.stored = stored
        self.saves = 0

    async def save(self, credentials: dict[str, Any]) -> None:
        self.stored = dict(credentials)
        self.saves += 1

    async def load(self) -> dict[str, Any] | None:
        return self.stored


async def test_one_refresh_at_a_time_per_mailbox_and_the_others_use_it(
    microsoft: SandboxServer, runtime: Runtime
) -> None:
    """Fifty concurrent calls of two providers of one mailbox find the access token lapsed:
    one refresh is made, stored at once, and every call uses its token (before: one refresh
    per call, each rotating the refresh token)."""
    address, credentials = outlook_account(microsoft, 0)
    credentials["expires_at"] = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    account = microsoft.microsoft.account(address)
    assert account is not None
    before = account.refreshes
    mailbox_id = str(uuid.uuid4())
    providers = [outlook(runtime, mailbox_id, address, credentials) for _ in range(2)]
    store = MemoryStore()
    for provider in providers:
        provider.credential_store = store
    try:
        answers = await asyncio.gather(*(providers[i % 2].me() for i in range(50)))
    finally:
        for provider in providers:
            await provider.close()
    assert all(me.mail == address for me in answers)
    assert account.refreshes - before == 1
    assert store.saves == 1 and store.stored is not None
    assert store.stored["refresh_token"] != credentials["refresh_token"]
    assert {p.tokens.current() for p in providers} == {store.stored["access_token"]}


async def test_credentials_another_process_refreshed_are_read_before_refreshing(
    microsoft: SandboxServer, runtime: Runtime
) -> None:
    """Another worker refreshed and stored the mailbox's tokens: this one reads the store
    under the mailbox's lock and uses them instead of refreshing again."""
    address, credentials = outlook_account(microsoft, 0)
    fresh = dict(credentials)
    credentials["expires_at"] = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    credentials["access_token"] = "lapsed"
    account = microsoft.microsoft.account(address)
    assert account is not None
    before = account.refreshes
    provider = outlook(runtime, str(uuid.uuid4()), address, credentials)
    provider.credential_store = MemoryStore(fresh)
    try:
        assert (await provider.me()).mail == address
    finally:
        await provider.close()
    assert account.refreshes == before
    assert provider.tokens.current() == fresh["access_token"]
    assert provider.updated_credentials() is not None


async def test_r14_a_push_gmail_dropped_only_delays_the_mail_until_the_next_poll(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    """Gmail drops notifications above one per second per user. Mail whose push was dropped
    is filed by the next poll (R14's interval), not lost."""
    from tests.test_gmail import deliver, emails_of, settle

    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "po@client.test", "Po")
    sandbox = google.google
    original = (sandbox.merge_pushes, sandbox.push_min_interval)
    sandbox.merge_pushes, sandbox.push_min_interval = False, 600.0
    try:
        await deliver(google, address, raw_message("po@client.test", [address], "Announced"))
        await settle(google)
        await drain(runtime)
        await deliver(google, address, raw_message("po@client.test", [address], "Dropped"))
        await settle(google)
        await drain(runtime)
        account = sandbox.account(address)
        assert account is not None and account.pushes_dropped == 1
        assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Announced"]
    finally:
        sandbox.merge_pushes, sandbox.push_min_interval = original
    clock.advance(timedelta(seconds=runtime.settings.sync_interval_seconds + 1))
    async with runtime.db.sessionmaker() as session:
        due = await due_mailboxes(session, runtime.settings.sync_interval_seconds)
    assert mailbox_id in due
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await drain(runtime)
    subjects = {e.subject for e in await emails_of(runtime, owner.workspace.id)}
    assert subjects == {"Announced", "Dropped"}


async def test_a_watch_gmail_may_not_publish_for_is_reported_to_the_operator(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Gmail needs publish rights on the Pub/Sub topic; without them `watch` answers 403.
    The operator gets an ERROR naming the topic and what to grant; the pass (and the user's
    mailbox) carries on, mail arriving by polling."""
    topic = runtime.settings.google_pubsub_topic
    google.google.unpublishable.add(topic)
    caplog.set_level(logging.ERROR, logger="backend.providers.gmail.provider")
    try:
        _, mailbox_id, _ = await connected(gql, factory, google, runtime)
    finally:
        google.google.unpublishable.discard(topic)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.PENDING and mailbox.push_renewed_at is None
    assert await error_codes(runtime, mailbox_id) == []
    (record,) = [r for r in caplog.records if "Pub/Sub Publisher" in r.getMessage()]
    assert topic in record.getMessage() and "gmail-api-push@" in record.getMessage()


def test_backoff_doubles_with_jitter_halves_batches_and_gives_up_past_the_cap() -> None:
    """Google's backoff recipe: waits of 1, 2, 4 ... s plus a random part, up to 64 s."""
    moment = [100.0]
    pace = Backoff(clock=lambda: moment[0])
    assert pace.batch_size == 50 and not pace.exhausted
    waits = []
    while not pace.exhausted:
        waits.append(pace.rate_limited())
    steps = [1, 2, 4, 8, 16, 32, 64, 64]
    assert len(waits) == len(steps)
    assert all(step / 2 <= wait <= step for wait, step in zip(waits, steps, strict=True))
    assert pace.not_before >= moment[0] + waits[-1]
    assert pace.batch_size == 5  # halved down to the floor
    pace.succeeded()
    assert pace.failures == 0 and pace.batch_size == 10
    assert pace.rate_limited(retry_after=3.0) == 3.0  # a Retry-After is taken as said


async def test_google_refusing_the_oauth_client_is_the_operators_problem(
    google: SandboxServer, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6749 section 5.2: `invalid_client` is the client's authentication failing (a wrong
    or deleted client secret), not the user's grant: logged for the operator, retried, no
    "reconnect" (before: ACCESS_REVOKED)."""
    address = gmail_account(google, 0)
    token = google.google.mint_token(address)
    grant = next(g for g in google.google.grants.values() if g.email == address)
    google.google.expire_access_tokens(address)
    google.google.faults.add(
        Fault(status=401, reason="invalid_client", account=address, path="/token", times=1)
    )
    credentials = {"access_token": token, "refresh_token": grant.refresh_token}
    account = MailboxAccount(id=str(uuid.uuid4()), email_address=address)
    provider = GmailProvider(account, credentials, runtime.settings)
    caplog.set_level(logging.ERROR, logger="backend.providers.gmail.client")
    try:
        with pytest.raises(ProviderConfigurationError) as refused:
            await provider.profile()
    finally:
        await provider.close()
    assert refused.value.code == "PROVIDER_UNAVAILABLE"
    assert any("OAuth client" in r.getMessage() for r in caplog.records)
