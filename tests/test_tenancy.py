"""Every root field confines the viewer to their workspace: another's objects look missing."""

from __future__ import annotations

from typing import Any

import pytest

from backend.graphql.relay import to_global_id
from tests.client import GQL
from tests.factories import Factory, Member, raw_message


@pytest.fixture
async def two_tenants(factory: Factory) -> tuple[Member, Member, dict[str, str]]:
    alpha = await factory.workspace()
    beta = await factory.workspace()
    mailbox = await factory.mailbox(alpha)
    contact = await factory.contact(alpha, "zed@alpha-client.test", "Zed")
    email = await factory.email(
        alpha, mailbox, raw_message("zed@alpha-client.test", [alpha.email], "Secret")
    )
    ids = {
        "user": to_global_id("User", alpha.user.id),
        "workspace": to_global_id("Workspace", alpha.workspace.id),
        "contact": to_global_id("Contact", contact.id),
        "email": to_global_id("Email", email.id),
        "thread": to_global_id("Thread", email.thread_id),
        "mailbox": to_global_id("Mailbox", mailbox.id),
    }
    exclusion = await GQL_for(factory).add_exclusion(alpha)
    ids["exclusion"] = exclusion
    return alpha, beta, ids


class GQL_for:
    def __init__(self, factory: Factory) -> None:
        self.factory = factory

    async def add_exclusion(self, member: Member) -> str:
        from backend.exclusions import service

        async with self.factory.db.transaction() as session:
            exclusion = await service.add_exclusion(session, member.viewer, "blocked-alpha.test")
        return to_global_id("Exclusion", exclusion.id)


async def test_root_fields_see_nothing_of_another_workspace(gql: GQL, two_tenants: Any) -> None:
    alpha, beta, ids = two_tenants
    for kind, gid in ids.items():
        assert (
            await gql("query($id: ID!) { node(id: $id) { id } }", {"id": gid}, token=beta.token)
        )["node"] is None, kind
        # The owner of the data does see it, so the test is not vacuous.
        assert (
            await gql("query($id: ID!) { node(id: $id) { id } }", {"id": gid}, token=alpha.token)
        )["node"] == {"id": gid}
    singles = {
        "contact": "query($id: ID!) { contact(id: $id) { id } }",
        "email": "query($id: ID!) { email(id: $id) { id } }",
        "thread": "query($id: ID!) { thread(id: $id) { id } }",
        "mailbox": "query($id: ID!) { mailbox(id: $id) { id } }",
    }
    for kind, query in singles.items():
        field = query.split("{ ")[1].split("(")[0]
        assert (await gql(query, {"id": ids[kind]}, token=beta.token))[field] is None
        assert (await gql(query, {"id": ids[kind]}, token=alpha.token))[field] == {"id": ids[kind]}
    lists = """
      query($contact: ID!, $mailbox: ID!) {
        viewer { workspace { id } user { id } }
        contacts { totalCount edges { node { id } } }
        emails { totalCount }
        byContact: emails(filter: {contactId: $contact}) { totalCount }
        byMailbox: emails(filter: {mailboxId: $mailbox}) { totalCount }
        threads { totalCount }
        contactThreads: threads(contactId: $contact) { totalCount }
        mailboxes { id }
        exclusions { totalCount }
        unassignedEmails { totalCount }
        connectionStatuses { user { id } }
      }
    """
    variables = {"contact": ids["contact"], "mailbox": ids["mailbox"]}
    seen_by_beta = await gql(lists, variables, token=beta.token)
    assert seen_by_beta["viewer"]["workspace"]["id"] != ids["workspace"]
    for field in (
        "contacts",
        "emails",
        "byContact",
        "byMailbox",
        "threads",
        "contactThreads",
        "exclusions",
        "unassignedEmails",
    ):
        assert seen_by_beta[field]["totalCount"] == 0, field
    assert seen_by_beta["mailboxes"] == []
    assert [s["user"]["id"] for s in seen_by_beta["connectionStatuses"]] == [
        to_global_id("User", beta.user.id)
    ]
    seen_by_alpha = await gql(lists, variables, token=alpha.token)
    for field in (
        "contacts",
        "emails",
        "byContact",
        "byMailbox",
        "threads",
        "contactThreads",
        "exclusions",
    ):
        assert seen_by_alpha[field]["totalCount"] == 1, field


async def test_mutations_cannot_touch_another_workspace(gql: GQL, two_tenants: Any) -> None:
    alpha, beta, ids = two_tenants
    mutations = [
        (
            "updateContact",
            'mutation($id: ID!) { updateContact(input: {id: $id, name: "x"}) { userErrors { code } } }',
            ids["contact"],
        ),
        (
            "setContactEmailSync",
            "mutation($id: ID!) { setContactEmailSync(contactId: $id, enabled: false) { userErrors { code } } }",
            ids["contact"],
        ),
        (
            "deleteEmail",
            "mutation($id: ID!) { deleteEmail(id: $id) { userErrors { code } } }",
            ids["email"],
        ),
        (
            "removeExclusion",
            "mutation($id: ID!) { removeExclusion(id: $id) { userErrors { code } } }",
            ids["exclusion"],
        ),
        (
            "updateMailbox",
            "mutation($id: ID!) { updateMailbox(input: {id: $id, visibility: METADATA_ONLY}) { userErrors { code } } }",
            ids["mailbox"],
        ),
        (
            "syncMailbox",
            "mutation($id: ID!) { syncMailbox(id: $id) { userErrors { code } } }",
            ids["mailbox"],
        ),
        (
            "disconnectMailbox",
            "mutation($id: ID!) { disconnectMailbox(input: {id: $id, eraseHistory: true}) { userErrors { code } } }",
            ids["mailbox"],
        ),
        (
            "deleteContact",
            "mutation($id: ID!) { deleteContact(id: $id) { userErrors { code } } }",
            ids["contact"],
        ),
    ]
    for field, mutation, gid in mutations:
        result = await gql(mutation, {"id": gid}, token=beta.token)
        assert result[field]["userErrors"] == [{"code": "NOT_FOUND"}], field
    file_email = await gql(
        "mutation($e: ID!, $c: ID!) { fileEmail(input: {emailId: $e, contactId: $c}) { userErrors { code } } }",
        {"e": ids["email"], "c": ids["contact"]},
        token=beta.token,
    )
    assert file_email["fileEmail"]["userErrors"] == [{"code": "NOT_FOUND"}]
    still_there = await gql(
        "query($id: ID!) { contact(id: $id) { name emailSyncEnabled timeline { totalCount } } mailboxes { status visibility } }",
        {"id": ids["contact"]},
        token=alpha.token,
    )
    assert still_there["contact"] == {
        "name": "Zed",
        "emailSyncEnabled": True,
        "timeline": {"totalCount": 1},
    }
    assert still_there["mailboxes"] == [{"status": "PENDING", "visibility": "SHARE_EVERYTHING"}]
