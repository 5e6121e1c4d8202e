"""Filing edge cases (R5, R6, R10, R11, R17 and the privacy of bodies) from the outside: the
public GraphQL API, the worker's real Gmail client, and the Google sandbox playing Gmail."""

from __future__ import annotations

import uuid
from email.utils import format_datetime, make_msgid
from typing import Any

from backend.graphql.relay import to_global_id
from backend.kit.clock import now
from backend.runtime import Runtime
from tests.client import GQL
from tests.factories import Factory, Member, raw_message, unique
from tests.sandbox import SandboxServer, call, raw_b64
from tests.test_gmail import connect, connected, deliver, settle
from tests.worker import drain

SETTINGS = """
mutation($input: UpdateWorkspaceSettingsInput!) {
  updateWorkspaceSettings(input: $input) { userErrors { code } }
}"""
CONTACTS = "query { contacts(first: 50) { edges { node { id name email } } } }"
EMAILS = """
query($filter: EmailFilter) {
  emails(first: 50, filter: $filter) {
    edges { node { id subject attachments { filename contentType } contacts { email } } }
  }
}"""


async def settings(gql: GQL, member: Member, **values: Any) -> None:
    body = await gql(SETTINGS, {"input": values}, token=member.token)
    assert body["updateWorkspaceSettings"]["userErrors"] == []


async def contacts(gql: GQL, member: Member) -> dict[str, str | None]:
    body = await gql(CONTACTS, token=member.token)
    return {e["node"]["email"]: e["node"]["name"] for e in body["contacts"]["edges"]}


async def emails(
    gql: GQL, member: Member, filter_: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    body = await gql(EMAILS, {"filter": filter_}, token=member.token)
    return [e["node"] for e in body["emails"]["edges"]]


async def send_from_gmail(google: SandboxServer, address: str, raw: bytes) -> dict[str, Any]:
    result: dict[str, Any] = await call(
        google.gmail(address).users().messages().send(userId="me", body={"raw": raw_b64(raw)})
    )
    return result


async def synced(google: SandboxServer, runtime: Runtime) -> None:
    await settle(google)
    await drain(runtime)


# ---------------------------------------------------------------- R5
async def test_r5_auto_creation_decides_per_address(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "ann@client.test", "Ann Known")
    await settings(gql, owner, contactAutoCreation="SENT")
    await send_from_gmail(
        google,
        address,
        raw_message(
            address,
            ["ann@client.test", "Bo New <bo@new.test>"],
            "Intro",
            cc=["Cy New <cy@new.test>", "noreply@new.test"],
        ),
    )
    await synced(google, runtime)
    assert await contacts(gql, owner) == {
        "ann@client.test": "Ann Known",
        "bo@new.test": "Bo New",
        "cy@new.test": "Cy New",
    }
    (email,) = await emails(gql, owner)
    assert sorted(c["email"] for c in email["contacts"]) == [
        "ann@client.test",
        "bo@new.test",
        "cy@new.test",
    ]


# ---------------------------------------------------------------- R10
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
# The image part of an HTML mail as each client writes it (headers as seen in the wild).
INLINE_SHAPES = {
    "gmail": (
        "ii_lx1abc0",
        'Content-Type: image/png; name="image.png"\r\n'
        'Content-Disposition: inline; filename="image.png"\r\n'
        "X-Attachment-Id: ii_lx1abc0\r\nContent-ID: <ii_lx1abc0>\r\n",
    ),
    "outlook": (
        "image001.png@01DA2B3C.4D5E6F70",
        'Content-Type: image/png; name="image001.png"\r\n'
        "Content-Description: image001.png\r\n"
        'Content-Disposition: attachment; filename="image001.png"; size=95\r\n'
        "Content-ID: <image001.png@01DA2B3C.4D5E6F70>\r\n",
    ),
    "apple mail": (
        "5E3B2C1A-9F0D-4E7B-8C6A-1D2E3F4A5B6C",
        "Content-Disposition: inline;\r\n\tfilename=logo.png\r\n"
        'Content-Type: image/png;\r\n\tx-unix-mode=0644;\r\n\tname="logo.png"\r\n'
        "Content-Id: <5E3B2C1A-9F0D-4E7B-8C6A-1D2E3F4A5B6C>\r\n",
    ),
    "thunderbird": (
        "part1.Zx9Qw8Er.Ty7Ui6Op@client.test",
        'Content-Type: image/png; name="logo.png"\r\n'
        'Content-Disposition: inline; filename="logo.png"\r\n'
        "Content-Id: <part1.Zx9Qw8Er.Ty7Ui6Op@client.test>\r\n",
    ),
    "name only": (
        "logo@client.test",
        'Content-Type: image/png; name="logo.png"\r\nContent-ID: <logo@client.test>\r\n',
    ),
}


def _html_with_image(sender: str, to: str, subject: str, cid: str, image_headers: str) -> bytes:
    boundary, related = "=_alt_" + uuid.uuid4().hex, "=_rel_" + uuid.uuid4().hex
    text = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: {make_msgid(domain='client.test')}\r\nDate: {format_datetime(now())}\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f'--{boundary}\r\nContent-Type: multipart/related; boundary="{related}"\r\n\r\n'
        f"--{related}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f'<p>Our logo</p><img src="cid:{cid}" alt="logo">\r\n'
        f"--{related}\r\n{image_headers}Content-Transfer-Encoding: base64\r\n\r\n"
        f"{PNG_B64}\r\n--{related}--\r\n"
        f'--{boundary}\r\nContent-Type: application/pdf; name="offer.pdf"\r\n'
        'Content-Disposition: attachment; filename="offer.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
        f"--{boundary}--\r\n"
    )
    return text.encode()


async def test_r10_images_shown_by_cid_are_inline_whatever_their_disposition(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "dan@client.test", "Dan")
    for name, (cid, headers) in INLINE_SHAPES.items():
        await deliver(
            google, address, _html_with_image("dan@client.test", address, name, cid, headers)
        )
    await synced(google, runtime)
    found = {e["subject"]: e["attachments"] for e in await emails(gql, owner)}
    pdf = [{"filename": "offer.pdf", "contentType": "application/pdf"}]
    assert found == {name: pdf for name in INLINE_SHAPES}


# ---------------------------------------------------------------- R17
VISIBILITY = """
mutation($id: ID!, $visibility: EmailVisibility) {
  updateMailbox(input: {id: $id, visibility: $visibility}) { userErrors { code } }
}"""


async def test_r17_search_matches_only_what_the_viewer_may_read(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    teammate = await factory.member(owner)
    await factory.contact(owner, "eli@client.test", "Eli")
    await deliver(
        google,
        address,
        raw_message("eli@client.test", [address], "Merger plans", "Codename bluebird"),
    )
    await synced(google, runtime)

    async def found(member: Member, search: str) -> int:
        return len(await emails(gql, member, {"search": search}))

    for visibility, subject, body in [
        ("SHARE_EVERYTHING", 1, 1),
        ("SUBJECT_ONLY", 1, 0),
        ("METADATA_ONLY", 0, 0),
    ]:
        changed = await gql(
            VISIBILITY,
            {"id": to_global_id("Mailbox", mailbox_id), "visibility": visibility},
            token=owner.token,
        )
        assert changed["updateMailbox"]["userErrors"] == []
        assert (await found(teammate, "MERGER"), await found(teammate, "bluebird")) == (
            subject,
            body,
        ), visibility
        # Participants are metadata, and the owner reads everything.
        assert await found(teammate, "eli@client") == 1
        assert (await found(owner, "merger"), await found(owner, "bluebird")) == (1, 1)


# ---------------------------------------------------------------- privacy of bodies
BODY = """
query($id: ID!) {
  email(id: $id) { inert: bodyHtml remote: bodyHtml(remoteImages: true) }
}"""


async def test_r10_remote_images_in_body_html_are_inert_unless_asked_for(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, _, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "fay@client.test", "Fay")
    html = (
        '<p>Hello</p><img src="https://track.sender.test/open.gif?u=1" width="1" height="1">'
        '<img src="cid:logo@client.test" alt="logo">'
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="dot">'
    )
    await deliver(
        google, address, raw_message("fay@client.test", [address], "Tracked", "Hello", html=html)
    )
    await synced(google, runtime)
    (email,) = await emails(gql, owner)
    body = (await gql(BODY, {"id": email["id"]}, token=owner.token))["email"]
    assert "track.sender.test" not in body["inert"]
    assert 'src="cid:logo@client.test"' in body["inert"]
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in body["inert"]
    assert 'src="https://track.sender.test/open.gif?u=1"' in body["remote"]


# ---------------------------------------------------------------- R11
DELETE = "mutation($id: ID!) { deleteEmail(id: $id) { deletedId userErrors { code } } }"


async def test_r11_a_deleted_email_never_returns_from_any_mailbox(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    teammate = await factory.member(owner)
    other = f"{unique('gm')}@gmail.sandbox.test"
    google.google.ensure_account(other)
    await connect(gql, teammate, other)
    await factory.contact(owner, "gus@client.test", "Gus")
    unwanted = raw_message(
        "gus@client.test", [address, other], "Unwanted", message_id="<unwanted@client.test>"
    )
    await deliver(google, address, unwanted)
    await synced(google, runtime)
    (email,) = await emails(gql, owner)
    deleted = await gql(DELETE, {"id": email["id"]}, token=owner.token)
    assert deleted["deleteEmail"]["userErrors"] == []

    # Gmail's history expires: the mailbox re-lists everything since the connection.
    google.google.expire_history(address)
    await deliver(google, address, raw_message("gus@client.test", [address], "Wanted"))
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    # Another mailbox of the workspace has its own copy.
    await deliver(google, other, unwanted)
    await synced(google, runtime)
    assert [e["subject"] for e in await emails(gql, owner)] == ["Wanted"]


# ---------------------------------------------------------------- R6
DISCONNECT = """
mutation($id: ID!) { disconnectMailbox(input: {id: $id}) { mailbox { status } userErrors { code } } }"""


async def test_r6_connect_mailbox_resumes_a_disconnected_account_and_files_the_gap(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "hal@client.test", "Hal")
    await deliver(google, address, raw_message("hal@client.test", [address], "Before"))
    await synced(google, runtime)
    gone = await gql(DISCONNECT, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token)
    assert gone["disconnectMailbox"] == {"mailbox": {"status": "DISCONNECTED"}, "userErrors": []}
    await drain(runtime)
    await deliver(google, address, raw_message("hal@client.test", [address], "In the gap"))

    assert await connect(gql, owner, address) == mailbox_id  # the same mailbox, resumed
    await synced(google, runtime)
    listed = await gql("query { mailboxes { id status } }", token=owner.token)
    assert listed["mailboxes"] == [{"id": to_global_id("Mailbox", mailbox_id), "status": "ACTIVE"}]
    assert sorted(e["subject"] for e in await emails(gql, owner)) == ["Before", "In the gap"]
