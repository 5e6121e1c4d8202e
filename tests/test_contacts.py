"""Contacts: validation as userErrors, search, and cursors that stay put while data arrives."""

from __future__ import annotations

from tests.client import GQL
from tests.factories import Factory

CREATE = """
mutation($input: CreateContactInput!) {
  createContact(input: $input) { contact { id name email additionalEmails owner { email } } userErrors { field code message } }
}
"""
UPDATE = """
mutation($input: UpdateContactInput!) {
  updateContact(input: $input) { contact { name email additionalEmails owner { email } } userErrors { field code } }
}
"""


async def test_create_normalizes_addresses(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    data = await gql(
        CREATE,
        {
            "input": {
                "name": " Ann ",
                "email": " Ann@Example.COM ",
                "additionalEmails": ["ann@bücher.example"],
            }
        },
        token=owner.token,
    )
    contact = data["createContact"]["contact"]
    assert contact["name"] == "Ann"
    assert contact["email"] == "ann@example.com"
    assert contact["additionalEmails"] == ["ann@xn--bcher-kva.example"]
    assert data["createContact"]["userErrors"] == []


async def test_bad_input_is_a_user_error_and_stores_nothing(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    cases = [
        ({"email": "not-an-address"}, ["input", "email"], "INVALID_EMAIL"),
        (
            {"email": "a@b.test", "additionalEmails": ["ok@b.test", "nope"]},
            ["input", "additionalEmails", "1"],
            "INVALID_EMAIL",
        ),
        (
            {"email": "a@b.test", "additionalEmails": ["A@B.test"]},
            ["input", "additionalEmails", "0"],
            "DUPLICATE_EMAIL",
        ),
        (
            {"email": "a@b.test", "ownerId": "VXNlcjpub3QtYS11dWlk"},
            ["input", "ownerId"],
            "NOT_FOUND",
        ),
        (
            {"email": "a@b.test", "additionalEmails": [f"x{i}@b.test" for i in range(60)]},
            ["input", "additionalEmails"],
            "TOO_MANY_ADDRESSES",
        ),
    ]
    for payload, field, code in cases:
        result = (await gql(CREATE, {"input": payload}, token=owner.token))["createContact"]
        assert result["contact"] is None
        assert [(e["field"], e["code"]) for e in result["userErrors"]] == [(field, code)], payload
    assert (await gql("{ contacts { totalCount } }", token=owner.token))["contacts"][
        "totalCount"
    ] == 0


async def test_update_changes_only_what_is_given(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    created = await gql(
        CREATE,
        {"input": {"name": "Bo", "email": "bo@x.test", "additionalEmails": ["bo@y.test"]}},
        token=owner.token,
    )
    contact_id = created["createContact"]["contact"]["id"]
    from backend.graphql.relay import to_global_id

    renamed = await gql(
        UPDATE, {"input": {"id": contact_id, "name": "Bo Diddley"}}, token=owner.token
    )
    assert renamed["updateContact"]["contact"] == {
        "name": "Bo Diddley",
        "email": "bo@x.test",
        "additionalEmails": ["bo@y.test"],
        "owner": None,
    }
    moved = await gql(
        UPDATE,
        {
            "input": {
                "id": contact_id,
                "email": "bo@z.test",
                "ownerId": to_global_id("User", teammate.user.id),
            }
        },
        token=owner.token,
    )
    assert moved["updateContact"]["contact"]["email"] == "bo@z.test"
    assert moved["updateContact"]["contact"]["additionalEmails"] == ["bo@y.test"]
    assert moved["updateContact"]["contact"]["owner"] == {"email": teammate.email}
    bad = await gql(UPDATE, {"input": {"id": contact_id, "email": "broken"}}, token=owner.token)
    assert bad["updateContact"]["userErrors"] == [
        {"field": ["input", "email"], "code": "INVALID_EMAIL"}
    ]
    still = await gql(
        "query($id: ID!) { contact(id: $id) { email } }", {"id": contact_id}, token=owner.token
    )
    assert still["contact"]["email"] == "bo@z.test"


async def test_delete_contact(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    contact = await factory.contact(owner, "gone@x.test")
    from backend.graphql.relay import to_global_id

    gid = to_global_id("Contact", contact.id)
    result = await gql(
        "mutation($id: ID!) { deleteContact(id: $id) { deletedId userErrors { code } } }",
        {"id": gid},
        token=owner.token,
    )
    assert result["deleteContact"] == {"deletedId": gid, "userErrors": []}
    assert (
        await gql("query($id: ID!) { contact(id: $id) { id } }", {"id": gid}, token=owner.token)
    )["contact"] is None


async def test_search_by_name_and_address(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    await factory.contact(owner, "hana@alpha.test", "Hana Lee")
    await factory.contact(owner, "ivo@beta.test", "Ivo")
    await factory.contact(owner, "jo@gamma.test", "Jo", additional=["jo@alpha.test"])
    query = "query($s: String) { contacts(search: $s) { totalCount edges { node { name } } } }"
    by_name = await gql(query, {"s": "hana"}, token=owner.token)
    assert [e["node"]["name"] for e in by_name["contacts"]["edges"]] == ["Hana Lee"]
    by_domain = await gql(query, {"s": "@ALPHA"}, token=owner.token)
    assert sorted(e["node"]["name"] for e in by_domain["contacts"]["edges"]) == ["Hana Lee", "Jo"]


async def test_cursors_stay_stable_while_new_contacts_arrive(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    for i in range(5):
        await factory.contact(owner, f"p{i}@page.test", f"P{i}")
    page = "query($after: String) { contacts(first: 2, after: $after) { edges { node { name } } pageInfo { hasNextPage hasPreviousPage endCursor } } }"
    first = (await gql(page, {"after": None}, token=owner.token))["contacts"]
    assert [e["node"]["name"] for e in first["edges"]] == ["P4", "P3"]
    assert first["pageInfo"]["hasNextPage"] and not first["pageInfo"]["hasPreviousPage"]
    await factory.contact(owner, "new@page.test", "Newcomer")  # lands at the head, not mid-page
    second = (await gql(page, {"after": first["pageInfo"]["endCursor"]}, token=owner.token))[
        "contacts"
    ]
    assert [e["node"]["name"] for e in second["edges"]] == ["P2", "P1"]
    assert second["pageInfo"]["hasPreviousPage"]
    third = (await gql(page, {"after": second["pageInfo"]["endCursor"]}, token=owner.token))[
        "contacts"
    ]
    assert [e["node"]["name"] for e in third["edges"]] == ["P0"]
    assert not third["pageInfo"]["hasNextPage"]


async def test_bad_cursor_and_page_size(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    body = await gql.raw('{ contacts(after: "%%%") { totalCount } }', token=owner.token)
    assert body["data"] is None and "cursor" in body["errors"][0]["message"]
    body = await gql.raw("{ contacts(first: -1) { totalCount } }", token=owner.token)
    assert "must not be negative" in body["errors"][0]["message"]
    await factory.contact(owner)
    capped = await gql("{ contacts(first: 100000) { edges { cursor } } }", token=owner.token)
    assert len(capped["contacts"]["edges"]) == 1
