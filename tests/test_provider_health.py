"""Issue 19 items 3 and 5: a provider refusing mailsync's own configuration (failing passes,
or a refused Gmail `watch`) reaches the operator's health checks (`/readyz`), without blaming
the users whose mailboxes it touches."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from backend.mailboxes.service import read_credentials, write_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus, ProviderIssue, ProviderProblem
from backend.providers.base import Provider
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from backend.sync.jobs import run_pass
from tests.client import GQL
from tests.conftest import LiveServer
from tests.factories import Factory, raw_message
from tests.sandbox import SandboxServer
from tests.sync_helpers import error_codes, reload_mailbox
from tests.test_gmail import connected as connected_gmail
from tests.test_gmail import deliver, emails_of
from tests.test_microsoft import connected as connected_outlook


async def readiness(api: LiveServer) -> tuple[int, dict[str, Any], str]:
    async with httpx.AsyncClient(base_url=api.url) as client:
        answer = await client.get("/readyz")
    return answer.status_code, answer.json(), answer.text


async def lapse_access_token(runtime: Runtime, mailbox_id: uuid.UUID) -> None:
    """The next pass must refresh, which is when the token endpoint judges the app."""
    async with runtime.unit_of_work() as work:
        row = await work.session.get(Mailbox, mailbox_id)
        assert row is not None
        lapsed = read_credentials(runtime.settings.secret, row)
        lapsed["expires_at"] = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        write_credentials(runtime.settings.secret, row, lapsed)
        work.session.add(row)


async def test_r13_an_expired_app_secret_shows_in_readyz_until_a_failed_mailbox_syncs_again(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    # The database lives for the whole session: start from no recorded issue.
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
    status, body, _ = await readiness(api)
    assert (status, body["status"], body["providers"]) == (200, "ok", [])

    _, failing_id, failing = await connected_outlook(gql, factory, microsoft, runtime)
    _, healthy_id, _ = await connected_outlook(gql, factory, microsoft, runtime)
    microsoft.microsoft.expire_access_tokens(failing)
    await lapse_access_token(runtime, failing_id)
    microsoft.microsoft.faults.add(
        Fault(
            status=401,
            reason="invalid_client",
            message="AADSTS7000222: The provided client secret keys are expired.",
            account=failing,
            path="/token",
        )
    )
    await run_pass(runtime, failing_id)
    # The user is not blamed: no "reconnect", the mailbox retries as PROVIDER_UNAVAILABLE.
    assert (await reload_mailbox(runtime, failing_id)).status == MailboxStatus.ERROR
    assert await error_codes(runtime, failing_id) == ["PROVIDER_UNAVAILABLE"]

    status, body, text = await readiness(api)
    # Degraded, still ready: this process serves, and leaving rotation would fix nothing.
    assert (status, body["ready"], body["status"]) == (200, True, "degraded")
    (issue,) = body["providers"]
    assert issue["provider"] == "MICROSOFT"
    assert issue["problem"] == "configuration"
    assert "MAILSYNC_MICROSOFT_CLIENT_SECRET" in issue["fix"]
    assert "7000222" in issue["detail"]
    assert issue["failures"] == 1
    # An operator's report about the app, not about whose mailbox happened to refresh.
    assert failing not in text and str(failing_id) not in text

    # A mailbox whose access token needed no refresh syncs, which proves nothing.
    await run_pass(runtime, healthy_id)
    assert (await reload_mailbox(runtime, healthy_id)).status != MailboxStatus.ERROR
    _, body, _ = await readiness(api)
    assert [p["provider"] for p in body["providers"]] == ["MICROSOFT"]

    # The operator installs a new secret; the failed mailbox's next pass succeeds.
    microsoft.microsoft.faults.clear()
    await run_pass(runtime, failing_id)
    assert (await reload_mailbox(runtime, failing_id)).status != MailboxStatus.ERROR
    status, body, _ = await readiness(api)
    assert (status, body["status"], body["providers"]) == (200, "ok", [])


async def test_r13_each_failure_of_a_misconfigured_provider_is_counted_in_one_entry(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    """Many mailboxes fail at once when the secret expires: one entry per provider, with the
    count and the time it was last seen, not one per mailbox."""
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
    addresses = []
    for _ in range(2):
        _, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
        microsoft.microsoft.expire_access_tokens(address)
        await lapse_access_token(runtime, mailbox_id)
        addresses.append((mailbox_id, address))
    microsoft.microsoft.faults.add(
        Fault(status=401, reason="invalid_client", message="AADSTS7000215", path="/token")
    )
    for mailbox_id, _ in addresses:
        await run_pass(runtime, mailbox_id)
    _, body, _ = await readiness(api)
    (issue,) = body["providers"]
    assert issue["provider"] == "MICROSOFT" and issue["failures"] == 2
    assert issue["firstSeenAt"] <= issue["lastSeenAt"]
    microsoft.microsoft.faults.clear()


async def test_r13_google_refusing_the_oauth_client_shows_in_readyz_until_fixed(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
    _, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    google.google.expire_access_tokens(address)
    google.google.faults.add(
        Fault(status=401, reason="invalid_client", account=address, path="/token")
    )
    await run_pass(runtime, mailbox_id)
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ERROR
    assert await error_codes(runtime, mailbox_id) == ["PROVIDER_UNAVAILABLE"]
    status, body, text = await readiness(api)
    assert (status, body["status"]) == (200, "degraded")
    (issue,) = body["providers"]
    assert issue["provider"] == "GMAIL" and "MAILSYNC_GOOGLE_CLIENT_SECRET" in issue["fix"]
    assert address not in text

    google.google.faults.clear()
    await run_pass(runtime, mailbox_id)
    assert (await reload_mailbox(runtime, mailbox_id)).status != MailboxStatus.ERROR
    status, body, _ = await readiness(api)
    assert (status, body["status"], body["providers"]) == (200, "ok", [])


async def test_an_issue_nothing_retried_for_48_hours_is_no_longer_reported(
    runtime: Runtime, api: LiveServer
) -> None:
    """Its mailboxes were disconnected or SUSPENDED (R13): nothing will clear the entry."""
    stale = datetime.now(UTC) - timedelta(hours=49)
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
        work.session.add(
            ProviderIssue(
                provider=Provider.MICROSOFT,
                fix="check MAILSYNC_MICROSOFT_CLIENT_SECRET",
                detail="configuration: stale",
                first_seen_at=stale,
                last_seen_at=stale,
            )
        )
    status, body, _ = await readiness(api)
    assert (status, body["status"], body["providers"]) == (200, "ok", [])
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))


async def test_r14_a_watch_gmail_may_not_publish_for_shows_in_readyz_until_a_watch_succeeds(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    """Without publish rights on the topic Gmail answers `watch` with 403: the passes go on
    by polling (R14), the user is not blamed (R13), and the operator sees the refusal on
    `/readyz` as its own problem until a watch succeeds after the fix."""
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
    topic = runtime.settings.google_pubsub_topic
    google.google.unpublishable.add(topic)
    try:
        owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
        mailbox = await reload_mailbox(runtime, mailbox_id)
        assert mailbox.status == MailboxStatus.PENDING and mailbox.push_renewed_at is None
        assert await error_codes(runtime, mailbox_id) == []
        status, body, text = await readiness(api)
        assert (status, body["ready"], body["status"]) == (200, True, "degraded")
        (issue,) = body["providers"]
        assert (issue["provider"], issue["problem"], issue["failures"]) == ("GMAIL", "push", 1)
        assert "MAILSYNC_GOOGLE_PUBSUB_TOPIC" in issue["fix"]
        assert "Pub/Sub Publisher" in issue["fix"] and "gmail-api-push@" in issue["fix"]
        assert topic in issue["detail"]
        assert address not in text and str(mailbox_id) not in text

        # Mail still arrives, by polling; each pass tries the watch again.
        await factory.contact(owner, "pat@client.test", "Pat")
        await deliver(google, address, raw_message("pat@client.test", [address], "Polled"))
        await run_pass(runtime, mailbox_id)
        assert [e.subject for e in await emails_of(runtime, owner.workspace.id)] == ["Polled"]
        mailbox = await reload_mailbox(runtime, mailbox_id)
        assert mailbox.status == MailboxStatus.ACTIVE and mailbox.push_renewed_at is None
        _, body, _ = await readiness(api)
        assert [(p["problem"], p["failures"]) for p in body["providers"]] == [("push", 2)]
    finally:
        # The operator grants the role on the topic.
        google.google.unpublishable.discard(topic)
    await run_pass(runtime, mailbox_id)
    assert (await reload_mailbox(runtime, mailbox_id)).push_renewed_at is not None
    status, body, _ = await readiness(api)
    assert (status, body["status"], body["providers"]) == (200, "ok", [])


async def test_a_configuration_issue_and_a_push_issue_of_one_provider_are_listed_and_cleared_apart(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    """A refused watch must not hide failing passes, nor a passing watch clear them."""
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
    _, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    async with runtime.unit_of_work() as work:
        work.session.add(
            ProviderIssue(
                provider=Provider.GMAIL,
                problem=ProviderProblem.PUSH,
                fix="grant the Pub/Sub Publisher role on MAILSYNC_GOOGLE_PUBSUB_TOPIC",
                detail="configuration: topic",
            )
        )
    google.google.expire_access_tokens(address)
    google.google.faults.add(
        Fault(status=401, reason="invalid_client", account=address, path="/token")
    )
    await run_pass(runtime, mailbox_id)
    _, body, _ = await readiness(api)
    assert [(p["provider"], p["problem"]) for p in body["providers"]] == [
        ("GMAIL", "configuration"),
        ("GMAIL", "push"),
    ]
    # The secret is fixed: the mailbox syncs again, which clears the configuration entry
    # only (its watch, accepted at connection, is not due again, so nothing proves the topic).
    google.google.faults.clear()
    await run_pass(runtime, mailbox_id)
    _, body, _ = await readiness(api)
    assert [(p["provider"], p["problem"]) for p in body["providers"]] == [("GMAIL", "push")]
    async with runtime.unit_of_work() as work:
        await work.session.execute(sa.delete(ProviderIssue))
