"""Exclusions through the API: validation, R4 role visibility, purgeExisting."""

from __future__ import annotations

from backend.auth.tables import Role
from backend.graphql.relay import to_global_id
from tests.client import GQL
from tests.factories import Factory, raw_message

ADD = """
mutation($value: String!, $purge: Boolean) {
  addExclusion(input: {value: $value, purgeExisting: $purge}) {
    exclusion { id value kind createdBy { email } } userErrors { field code }
  }
}
"""
LIST = "{ exclusions { totalCount edges { node { value } } } }"
REMOVE = "mutation($id: ID!) { removeExclusion(id: $id) { deletedId userErrors { code } } }"


async def test_addresses_and_domains_are_validated_and_normalized(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    address = (await gql(ADD, {"value": " Bob@Example.COM "}, token=owner.token))["addExclusion"]
    assert (
        address["exclusion"]["value"] == "bob@example.com"
        and address["exclusion"]["kind"] == "ADDRESS"
    )
    domain = (await gql(ADD, {"value": "@Spam.Example"}, token=owner.token))["addExclusion"]
    assert (
        domain["exclusion"]["value"] == "spam.example" and domain["exclusion"]["kind"] == "DOMAIN"
    )
    for bad, code in [
        ("not a domain!", "INVALID_DOMAIN"),
        ("x@", "INVALID_EMAIL"),
        ("spam.example", "ALREADY_EXCLUDED"),
    ]:
        result = (await gql(ADD, {"value": bad}, token=owner.token))["addExclusion"]
        assert result == {
            "exclusion": None,
            "userErrors": [{"field": ["input", "value"], "code": code}],
        }, bad


async def test_r4_a_public_suffix_is_refused_as_an_exclusion(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    for suffix in ["com", "COM", "@co.uk", "github.io", "香港"]:
        result = (await gql(ADD, {"value": suffix}, token=owner.token))["addExclusion"]
        assert result == {
            "exclusion": None,
            "userErrors": [{"field": ["input", "value"], "code": "PUBLIC_SUFFIX"}],
        }, suffix
    # A registrable domain under a suffix stays excludable, and nothing was stored.
    for domain in ["example.co.uk", "someone.github.io"]:
        added = (await gql(ADD, {"value": domain}, token=owner.token))["addExclusion"]
        assert added["userErrors"] == [] and added["exclusion"]["value"] == domain
    listed = (await gql(LIST, token=owner.token))["exclusions"]
    assert listed["totalCount"] == 2


async def test_r4_users_see_and_remove_only_their_own_exclusions(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    admin = await factory.member(owner, Role.ADMIN)
    user = await factory.member(owner, Role.USER)
    mine = (await gql(ADD, {"value": "mine.test"}, token=user.token))["addExclusion"]["exclusion"]
    theirs = (await gql(ADD, {"value": "theirs.test"}, token=owner.token))["addExclusion"][
        "exclusion"
    ]
    assert (await gql(LIST, token=user.token))["exclusions"]["edges"] == [
        {"node": {"value": "mine.test"}}
    ]
    assert (await gql(LIST, token=admin.token))["exclusions"]["totalCount"] == 2
    refused = await gql(REMOVE, {"id": theirs["id"]}, token=user.token)
    assert refused["removeExclusion"]["userErrors"] == [{"code": "NOT_FOUND"}]
    hidden = await gql(
        "query($id: ID!) { node(id: $id) { id } }", {"id": theirs["id"]}, token=user.token
    )
    assert hidden["node"] is None
    assert (await gql(REMOVE, {"id": mine["id"]}, token=user.token))["removeExclusion"][
        "userErrors"
    ] == []
    assert (await gql(REMOVE, {"id": theirs["id"]}, token=admin.token))["removeExclusion"][
        "userErrors"
    ] == []
    assert (await gql(LIST, token=owner.token))["exclusions"]["totalCount"] == 0


async def test_r4_purge_existing_unfiles_mail_the_exclusion_now_covers(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    kim = await factory.contact(owner, "kim@partner.test", "Kim")
    lou = await factory.contact(owner, "lou@other.test", "Lou")
    await factory.email(
        owner,
        mailbox,
        raw_message("kim@sub.partner.test", [owner.email], "From sub", cc=["lou@other.test"]),
    )
    await factory.email(
        owner,
        mailbox,
        raw_message("lou@other.test", [owner.email], "Lou cc Kim", cc=["kim@partner.test"]),
    )
    await factory.email(owner, mailbox, raw_message("kim@partner.test", [owner.email], "Direct"))
    timeline = "query($id: ID!) { contact(id: $id) { timeline { edges { node { subject } } } } }"

    async def subjects(contact_id: object) -> list[str]:
        data = await gql(timeline, {"id": to_global_id("Contact", contact_id)}, token=owner.token)  # type: ignore[arg-type]
        return sorted(e["node"]["subject"] for e in data["contact"]["timeline"]["edges"])

    assert await subjects(kim.id) == ["Direct", "Lou cc Kim"]
    assert await subjects(lou.id) == ["From sub", "Lou cc Kim"]
    await gql(ADD, {"value": "partner.test", "purge": False}, token=owner.token)
    assert await subjects(kim.id) == ["Direct", "Lou cc Kim"]  # without purge nothing changes
    await gql(
        REMOVE,
        {
            "id": (await gql(LIST.replace("value", "id value"), token=owner.token))["exclusions"][
                "edges"
            ][0]["node"]["id"]
        },
        token=owner.token,
    )
    await gql(ADD, {"value": "partner.test", "purge": True}, token=owner.token)
    # From/To excluded (also through a subdomain): off every timeline. Cc excluded: off Kim's only.
    assert await subjects(kim.id) == []
    assert await subjects(lou.id) == ["Lou cc Kim"]
    emails = await gql('{ emails(filter: {search: "From sub"}) { totalCount } }', token=owner.token)
    assert emails["emails"]["totalCount"] == 0  # R5: on no timeline any more, so not kept
