"""Mailboxes through the API: reading, updating, syncing, disconnecting, the mailbox limit."""

from __future__ import annotations

from backend.auth.tables import Role
from backend.graphql.relay import to_global_id
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import AccessRevoked, RateLimited
from backend.runtime import Runtime
from tests.client import GQL
from tests.factories import Factory, raw_message
from tests.providers import fake_provider
from tests.worker import drain

MAILBOX = """
query($id: ID!) {
  mailbox(id: $id) {
    provider emailAddress status syncMode visibility connectedAt lastSyncedAt lastEmailSyncedAt
    owner { email }
    lastError { code message recommendation occurredAt }
    errors { totalCount edges { node { code } } }
    activity(days: 7) { queued synced failed }
  }
}
"""


async def test_users_see_their_own_mailboxes_admins_see_all(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    user = await factory.member(owner, Role.USER)
    await factory.mailbox(owner)
    theirs = await factory.mailbox(user)
    assert len((await gql("{ mailboxes { id } }", token=owner.token))["mailboxes"]) == 2
    assert (await gql("{ mailboxes { id } }", token=user.token))["mailboxes"] == [
        {"id": to_global_id("Mailbox", theirs.id)}
    ]
    statuses = await gql(
        "{ connectionStatuses { user { email } health mailboxes { emailAddress } } }",
        token=owner.token,
    )
    assert {s["user"]["email"]: s["health"] for s in statuses["connectionStatuses"]} == {
        owner.email: "OK",
        user.email: "OK",
    }


async def test_sync_pass_updates_status_activity_and_errors(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    gid = to_global_id("Mailbox", mailbox.id)
    await factory.contact(owner, "mo@client.test")
    with fake_provider() as store:
        store.deliver(mailbox.email_address, raw_message("mo@client.test", [owner.email], "One"))
        store.deliver(mailbox.email_address, b"\x00\x01 not mail at all")
        store.deliver(
            mailbox.email_address, raw_message("stranger@else.test", [owner.email], "Not a contact")
        )
        result = await gql(
            "mutation($id: ID!) { syncMailbox(id: $id) { mailbox { status } userErrors { code } } }",
            {"id": gid},
            token=owner.token,
        )
        assert result["syncMailbox"] == {"mailbox": {"status": "PENDING"}, "userErrors": []}
        await drain(runtime)
        box = (await gql(MAILBOX, {"id": gid}, token=owner.token))["mailbox"]
        assert box["status"] == "ACTIVE"
        assert box["lastSyncedAt"] and box["lastEmailSyncedAt"]
        assert box["activity"] == {"queued": 3, "synced": 1, "failed": 1}
        assert box["errors"]["edges"] == [{"node": {"code": "IMPORT_FAILED"}}]
        assert box["lastError"] is None  # the pass succeeded; one message could not be imported

        store.fail_with(mailbox.email_address, RateLimited("slow down", retry_after=120))
        await runtime.jobs.enqueue_sync(str(mailbox.id))
        await drain(runtime)
        box = (await gql(MAILBOX, {"id": gid}, token=owner.token))["mailbox"]
        assert box["status"] == "ERROR"
        assert box["lastError"]["code"] == "RATE_LIMITED"
        assert box["lastError"]["message"] == "The provider is limiting requests for this account."
        assert box["lastError"]["recommendation"] == "Nothing to do: sync resumes automatically."
        async with runtime.db.transaction() as session:
            row = await session.get(Mailbox, mailbox.id)
            assert row is not None and row.next_attempt_at is not None
            assert (row.next_attempt_at - row.failing_since).total_seconds() >= 120  # type: ignore[operator]

        store.fail_with(mailbox.email_address, AccessRevoked("invalid_grant"))
        await runtime.jobs.enqueue_sync(str(mailbox.id))
        await drain(runtime)
        box = (await gql(MAILBOX, {"id": gid}, token=owner.token))["mailbox"]
        assert box["lastError"]["code"] == "ACCESS_REVOKED"
        assert (
            box["lastError"]["recommendation"]
            == "Reconnect the mailbox and grant the requested permissions."
        )
    statuses = await gql("{ connectionStatuses { health } }", token=owner.token)
    assert statuses["connectionStatuses"] == [{"health": "ERROR"}]


async def test_update_mailbox_settings(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    result = await gql(
        "mutation($id: ID!) { updateMailbox(input: {id: $id, syncMode: ONE_WAY, visibility: SUBJECT_ONLY}) { mailbox { syncMode visibility } userErrors { code } } }",
        {"id": to_global_id("Mailbox", mailbox.id)},
        token=owner.token,
    )
    assert result["updateMailbox"] == {
        "mailbox": {"syncMode": "ONE_WAY", "visibility": "SUBJECT_ONLY"},
        "userErrors": [],
    }


async def test_disconnect_with_erase_history_keeps_mail_another_mailbox_brought(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    first = await factory.mailbox(owner)
    second = await factory.mailbox(teammate)
    await factory.contact(owner, "nia@client.test")
    shared = raw_message("nia@client.test", [owner.email, teammate.email], "To both")
    await factory.email(owner, first, shared)
    await factory.email(teammate, second, shared)  # R7: the same email, seen again
    await factory.email(owner, first, raw_message("nia@client.test", [owner.email], "Only mine"))
    count = "{ emails { totalCount edges { node { subject } } } }"
    assert (await gql(count, token=owner.token))["emails"]["totalCount"] == 2
    result = await gql(
        "mutation($id: ID!) { disconnectMailbox(input: {id: $id, eraseHistory: true}) { mailbox { status } userErrors { code } } }",
        {"id": to_global_id("Mailbox", first.id)},
        token=owner.token,
    )
    assert result["disconnectMailbox"] == {"mailbox": {"status": "DISCONNECTED"}, "userErrors": []}
    left = (await gql(count, token=owner.token))["emails"]
    assert [e["node"]["subject"] for e in left["edges"]] == ["To both"]
    again = await gql(
        "mutation($id: ID!) { syncMailbox(id: $id) { userErrors { code } } }",
        {"id": to_global_id("Mailbox", first.id)},
        token=owner.token,
    )
    assert again["syncMailbox"]["userErrors"] == [{"code": "MAILBOX_DISCONNECTED"}]


async def test_mailbox_limit_holds_new_mailboxes_until_room_frees_up(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    await gql(
        "mutation { updateWorkspaceSettings(input: {mailboxLimit: 1}) { userErrors { code } } }",
        token=owner.token,
    )
    first = await factory.mailbox(owner, "one@crm.test")
    second = await factory.mailbox(owner, "two@crm.test")
    assert first.status == MailboxStatus.PENDING
    assert second.status == MailboxStatus.PENDING_LIMIT
    blocked = await gql(
        "mutation($id: ID!) { syncMailbox(id: $id) { userErrors { code } } }",
        {"id": to_global_id("Mailbox", second.id)},
        token=owner.token,
    )
    assert blocked["syncMailbox"]["userErrors"] == [{"code": "LIMIT_REACHED"}]
    await gql(
        "mutation($id: ID!) { disconnectMailbox(input: {id: $id}) { userErrors { code } } }",
        {"id": to_global_id("Mailbox", first.id)},
        token=owner.token,
    )
    promoted = await gql(
        "query($id: ID!) { mailbox(id: $id) { status } }",
        {"id": to_global_id("Mailbox", second.id)},
        token=owner.token,
    )
    assert promoted["mailbox"]["status"] == "PENDING"


async def test_raising_the_limit_starts_waiting_mailboxes(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    await gql(
        "mutation { updateWorkspaceSettings(input: {mailboxLimit: 0}) { userErrors { code } } }",
        token=owner.token,
    )
    waiting = await factory.mailbox(owner)
    assert waiting.status == MailboxStatus.PENDING_LIMIT
    raised = await gql(
        "mutation { updateWorkspaceSettings(input: {mailboxLimit: null}) { settings { mailboxLimit } } }",
        token=owner.token,
    )
    assert raised["updateWorkspaceSettings"]["settings"] == {"mailboxLimit": None}
    started = await gql("{ mailboxes { status } }", token=owner.token)
    assert started["mailboxes"] == [{"status": "PENDING"}]
