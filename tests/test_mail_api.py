"""Emails and threads through the API: filing by hand, deleting, filters, visibility (R17)."""

from __future__ import annotations

from backend.graphql.relay import to_global_id
from tests.client import GQL
from tests.factories import Factory, raw_message

FILE = "mutation($e: ID!, $c: ID!) { fileEmail(input: {emailId: $e, contactId: $c}) { email { contacts { name } } userErrors { field code } } }"
MOVE = "mutation($e: ID!, $f: ID!, $t: ID!) { moveEmail(input: {emailId: $e, fromContactId: $f, toContactId: $t}) { email { contacts { name } } userErrors { field code } } }"


async def test_r2_file_and_move_email_by_hand(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    first = await factory.contact(owner, "same@shared.test", "First")
    second = await factory.contact(owner, "same@shared.test", "Second")
    email = await factory.email(
        owner, mailbox, raw_message("same@shared.test", [owner.email], "Shared address")
    )
    e, c1, c2 = (
        to_global_id("Email", email.id),
        to_global_id("Contact", first.id),
        to_global_id("Contact", second.id),
    )
    shown = await gql(
        "query($e: ID!) { email(id: $e) { contacts { name } } }", {"e": e}, token=owner.token
    )
    assert shown["email"]["contacts"] == [{"name": "First"}]  # R2: the earliest-created contact
    moved = await gql(MOVE, {"e": e, "f": c1, "t": c2}, token=owner.token)
    assert moved["moveEmail"] == {"email": {"contacts": [{"name": "Second"}]}, "userErrors": []}
    again = await gql(MOVE, {"e": e, "f": c1, "t": c2}, token=owner.token)
    assert again["moveEmail"]["userErrors"] == [
        {"field": ["input", "fromContactId"], "code": "NOT_FILED"}
    ]
    filed = await gql(FILE, {"e": e, "c": c1}, token=owner.token)
    assert sorted(c["name"] for c in filed["fileEmail"]["email"]["contacts"]) == ["First", "Second"]
    twice = await gql(FILE, {"e": e, "c": c1}, token=owner.token)
    assert twice["fileEmail"]["userErrors"] == [
        {"field": ["input", "contactId"], "code": "ALREADY_FILED"}
    ]


async def test_r11_delete_email_removes_it_from_the_crm(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "ola@client.test")
    email = await factory.email(
        owner, mailbox, raw_message("ola@client.test", [owner.email], "Delete me")
    )
    gid = to_global_id("Email", email.id)
    result = await gql(
        "mutation($id: ID!) { deleteEmail(id: $id) { deletedId userErrors { code } } }",
        {"id": gid},
        token=owner.token,
    )
    assert result["deleteEmail"] == {"deletedId": gid, "userErrors": []}
    after = await gql(
        "query($id: ID!, $c: ID!) { email(id: $id) { id } contact(id: $c) { timeline { totalCount } threads { totalCount } } }",
        {"id": gid, "c": to_global_id("Contact", contact.id)},
        token=owner.token,
    )
    assert after == {
        "email": None,
        "contact": {"timeline": {"totalCount": 0}, "threads": {"totalCount": 0}},
    }


async def test_threads_and_email_filters(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "pia@client.test", "Pia")
    from tests.factories import in_minutes

    first = raw_message(
        "Pia <pia@client.test>",
        [owner.email],
        "Project kickoff",
        "Let us start",
        message_id="<kick@client.test>",
        date=in_minutes(1),
    )
    await factory.email(owner, mailbox, first)
    reply = raw_message(
        owner.email,
        ["pia@client.test"],
        "Re: Project kickoff",
        "Sounds good",
        in_reply_to="<kick@client.test>",
        date=in_minutes(2),
    )
    await factory.email(owner, mailbox, reply)
    await factory.email(
        owner,
        mailbox,
        raw_message(
            "pia@client.test", [owner.email], "Project kickoff", "Same subject, new thread"
        ),
    )
    data = await gql(
        """query($c: ID!) {
          threads(contactId: $c) { totalCount edges { node { subject emailCount participants { email }
            emails { edges { node { direction subject } } } contacts { name } } } }
          outgoing: emails(filter: {direction: OUTGOING}) { totalCount }
          searched: emails(filter: {search: "sounds"}) { totalCount }
          byContact: emails(filter: {contactId: $c}) { totalCount }
        }""",
        {"c": to_global_id("Contact", contact.id)},
        token=owner.token,
    )
    threads = data["threads"]
    assert threads["totalCount"] == 2  # R9: subjects alone never join threads
    joined = next(t["node"] for t in threads["edges"] if t["node"]["emailCount"] == 2)
    assert [e["node"]["direction"] for e in joined["emails"]["edges"]] == [
        "INCOMING",
        "OUTGOING",
    ]  # oldest first
    assert joined["contacts"] == [{"name": "Pia"}]
    assert {p["email"] for p in joined["participants"]} == {"pia@client.test", owner.email}
    assert data["outgoing"]["totalCount"] == 1
    assert data["searched"]["totalCount"] == 1
    assert data["byContact"]["totalCount"] == 3


async def test_r17_restricted_mailboxes_hide_fields_from_everyone_but_the_owner(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mailbox = await factory.mailbox(teammate)
    await factory.contact(owner, "ray@client.test")
    email = await factory.email(
        teammate, mailbox, raw_message("ray@client.test", [teammate.email], "Private plans", "Body")
    )
    query = "query($id: ID!) { email(id: $id) { subject snippet bodyText from { email } thread { subject } } }"
    variables = {"id": to_global_id("Email", email.id)}
    update = "mutation($id: ID!, $v: EmailVisibility) { updateMailbox(input: {id: $id, visibility: $v}) { userErrors { code } } }"
    full = {
        "subject": "Private plans",
        "snippet": "Body",
        "bodyText": "Body\n",
        "from": {"email": "ray@client.test"},
        "thread": {"subject": "Private plans"},
    }
    assert (await gql(query, variables, token=owner.token))["email"] == full
    await gql(
        update,
        {"id": to_global_id("Mailbox", mailbox.id), "v": "SUBJECT_ONLY"},
        token=teammate.token,
    )
    assert (await gql(query, variables, token=owner.token))["email"] == {
        **full,
        "snippet": None,
        "bodyText": None,
    }
    await gql(
        update,
        {"id": to_global_id("Mailbox", mailbox.id), "v": "METADATA_ONLY"},
        token=teammate.token,
    )
    hidden = {
        "subject": None,
        "snippet": None,
        "bodyText": None,
        "from": {"email": "ray@client.test"},
        "thread": {"subject": None},
    }
    assert (await gql(query, variables, token=owner.token))["email"] == hidden
    assert (await gql(query, variables, token=teammate.token))["email"] == full


async def test_a_colleague_reads_the_mail_but_not_the_mailbox_behind_it(
    gql: GQL, factory: Factory
) -> None:
    owner = await factory.workspace()
    colleague = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "ola@client.test")
    email = await factory.email(
        owner, mailbox, raw_message("ola@client.test", [owner.email], "Shared with the team")
    )
    query = """query($e: ID!, $m: ID!) { email(id: $e) { subject
        mailbox { emailAddress status lastError { code } activity(days: 7) { synced } } }
        mailbox(id: $m) { id } }"""
    variables = {"e": to_global_id("Email", email.id), "m": to_global_id("Mailbox", mailbox.id)}
    seen = await gql(query, variables, token=colleague.token)
    assert seen == {"email": {"subject": "Shared with the team", "mailbox": None}, "mailbox": None}
    managed = await gql(query, variables, token=owner.token)
    assert managed["email"]["mailbox"]["emailAddress"] == mailbox.email_address
    assert managed["mailbox"] == {"id": variables["m"]}
