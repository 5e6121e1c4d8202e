"""R15 end to end: sendEmail through the API, the send job in the worker, the real Google
and Microsoft clients against the sandboxes, and the Sent copy synced back."""

from __future__ import annotations

import base64
import email
import email.policy
import uuid
from typing import Any

import pytest
from sqlmodel import select

from backend.auth.tables import Role
from backend.graphql.relay import to_global_id
from backend.mail.tables import DeliveryStatus, Email, MailboxMessage
from backend.mailboxes.tables import MailboxStatus, SyncMode
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from tests.client import GQL, subscribe
from tests.conftest import LiveServer
from tests.factories import Factory, Member, raw_message, unique
from tests.sandbox import SandboxServer, call
from tests.sync_helpers import reload_mailbox
from tests.test_gmail import connected, deliver, emails_of
from tests.worker import drain, live_worker

SEND = """
mutation($input: SendEmailInput!) {
  sendEmail(input: $input) {
    email { id subject direction deliveryStatus deliveryError bodyText bodyHtml
            thread { id } contacts { name } }
    userErrors { field code message }
  }
}"""
EMAIL = "query($id: ID!) { email(id: $id) { deliveryStatus deliveryError thread { id } } }"
DELIVERY = """
subscription($m: ID) { emailDeliveryChanged(mailboxId: $m) {
  email { subject deliveryStatus } contacts { name } cursor } }"""


async def send(gql: GQL, member: Member, mailbox_id: uuid.UUID, **fields: Any) -> dict[str, Any]:
    payload = {"mailboxId": to_global_id("Mailbox", mailbox_id), "subject": "Hello", **fields}
    result: dict[str, Any] = (await gql(SEND, {"input": payload}, token=member.token))["sendEmail"]
    return result


def recipient(google: SandboxServer) -> str:
    address = f"{unique('ann')}@gmail.sandbox.test"
    google.google.ensure_account(address)
    return address


async def gmail_contact(factory: Factory, google: SandboxServer, owner: Member) -> str:
    """A contact "Ann" whose address is a Gmail sandbox account, so her inbox can be read."""
    address = recipient(google)
    await factory.contact(owner, address, "Ann")
    return address


async def inbox_of(google: SandboxServer, address: str, label: str = "INBOX") -> list[Any]:
    """The messages in a sandbox account's label, parsed from the raw MIME Gmail serves."""
    box = google.gmail(address)
    listed = await call(box.users().messages().list(userId="me", labelIds=[label]))
    out = []
    for item in listed.get("messages", []):
        got = await call(box.users().messages().get(userId="me", id=item["id"], format="raw"))
        raw = base64.urlsafe_b64decode(got["raw"] + "==")
        out.append((got, email.message_from_bytes(raw, policy=email.policy.default)))
    return out


async def stored(runtime: Runtime, email_id: str) -> Email:
    from backend.graphql.relay import parse_global_id

    parsed = parse_global_id(email_id)
    assert parsed is not None
    async with runtime.db.sessionmaker() as session:
        row = await session.get(Email, parsed[1])
        assert row is not None
        return row


async def test_r15_send_through_gmail_files_at_once_then_lands_in_sent_and_the_inbox(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    result = await send(
        gql,
        owner,
        mailbox_id,
        to=[ann],
        subject="Proposal",
        bodyHtml="<p>Dear Ann,</p><p>the <b>numbers</b>.</p><script>alert(1)</script>",
    )
    assert result["userErrors"] == []
    queued = result["email"]
    assert queued["deliveryStatus"] == "QUEUED"
    assert queued["direction"] == "OUTGOING"
    assert queued["contacts"] == [{"name": "Ann"}]
    assert "<script" not in queued["bodyHtml"] and "<b>numbers</b>" in queued["bodyHtml"]
    assert "Dear Ann," in queued["bodyText"]  # the text part derived from the HTML
    await drain(runtime)
    row = await stored(runtime, queued["id"])
    assert row.delivery_status == DeliveryStatus.SENT
    (received,) = await inbox_of(google, ann)
    parsed = received[1]
    assert parsed["Message-ID"].strip() == row.message_id
    assert parsed["Subject"] == "Proposal"
    assert parsed["From"].addresses[0].addr_spec == address
    assert parsed["From"].addresses[0].display_name == owner.user.name
    html = parsed.get_body(("html",))
    assert html is not None and "<script>alert(1)</script>" in html.get_content()  # as written
    sent = await inbox_of(google, address, "SENT")
    assert [m[1]["Message-ID"].strip() for m in sent] == [row.message_id]


async def test_r15_r9_a_reply_from_the_crm_stays_in_the_contact_thread(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    first = await deliver(
        google, address, raw_message(ann, [address], "Question", message_id=f"<{unique('q')}@c>")
    )
    await google.google.drain_pushes()
    await drain(runtime)
    (incoming,) = await emails_of(runtime, owner.workspace.id)
    result = await send(
        gql,
        owner,
        mailbox_id,
        to=[ann],
        subject="Re: Question",
        bodyText="Answer.",
        inReplyToEmailId=to_global_id("Email", incoming.id),
    )
    assert result["userErrors"] == []
    assert result["email"]["thread"]["id"] == to_global_id("Thread", incoming.thread_id)
    await drain(runtime)
    row = await stored(runtime, result["email"]["id"])
    assert row.in_reply_to == incoming.message_id
    assert row.references[-1] == incoming.message_id
    async with runtime.db.sessionmaker() as session:
        sighting = (
            await session.scalars(select(MailboxMessage).where(MailboxMessage.email_id == row.id))
        ).one()
    assert sighting.provider_thread_id == first["threadId"]  # the Gmail thread kept
    (received,) = await inbox_of(google, ann)
    assert received[1]["In-Reply-To"].strip() == incoming.message_id


async def test_r15_the_same_idempotency_key_returns_the_same_email_and_sends_once(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    key = unique("key-")
    first = await send(gql, owner, mailbox_id, to=[ann], bodyText="Once", idempotencyKey=key)
    again = await send(gql, owner, mailbox_id, to=[ann], bodyText="Once", idempotencyKey=key)
    assert first["email"]["id"] == again["email"]["id"]
    await drain(runtime)
    later = await send(gql, owner, mailbox_id, to=[ann], bodyText="Once", idempotencyKey=key)
    assert later["email"]["id"] == first["email"]["id"]
    assert later["email"]["deliveryStatus"] == "SENT"
    await drain(runtime)
    assert len(await inbox_of(google, ann)) == 1


async def test_r15_r7_the_sent_copy_synced_back_is_the_same_email(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    result = await send(gql, owner, mailbox_id, to=[ann], bodyText="Stored once")
    await drain(runtime)
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await google.google.drain_pushes()
    await drain(runtime)
    emails = await emails_of(runtime, owner.workspace.id)
    assert [e.id for e in emails] == [(await stored(runtime, result["email"]["id"])).id]
    assert emails[0].delivery_status == DeliveryStatus.SENT


async def test_r15_input_problems_are_user_errors_with_their_paths(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    bad = await send(
        gql, owner, mailbox_id, to=["ok@client.test", "not an address"], cc=["@nowhere"]
    )
    assert bad["email"] is None
    assert [(e["field"], e["code"]) for e in bad["userErrors"]] == [
        (["input", "to", "1"], "INVALID_EMAIL"),
        (["input", "cc", "0"], "INVALID_EMAIL"),
    ]
    nobody = await send(gql, owner, mailbox_id, to=[], bodyText="?")
    assert [e["code"] for e in nobody["userErrors"]] == ["NO_RECIPIENTS"]
    long = await send(gql, owner, mailbox_id, to=["a@client.test"], subject="x" * 999)
    assert [e["code"] for e in long["userErrors"]] == ["SUBJECT_TOO_LONG"]
    crowd = [f"p{i}@client.test" for i in range(600)]
    many = await send(gql, owner, mailbox_id, to=crowd)
    assert [e["code"] for e in many["userErrors"]] == ["TOO_MANY_RECIPIENTS"]
    admin = await factory.member(owner, Role.ADMIN)
    other = await send(gql, admin, mailbox_id, to=["a@client.test"])
    assert [e["code"] for e in other["userErrors"]] == ["NOT_MAILBOX_OWNER"]
    await gql(
        "mutation($id: ID!) { disconnectMailbox(input: {id: $id}) { userErrors { code } } }",
        {"id": to_global_id("Mailbox", mailbox_id)},
        token=owner.token,
    )
    gone = await send(gql, owner, mailbox_id, to=["a@client.test"])
    assert [e["code"] for e in gone["userErrors"]] == ["MAILBOX_DISCONNECTED"]
    assert await emails_of(runtime, owner.workspace.id) == []


async def test_r4_r5_crm_sent_mail_is_filed_on_excluded_contacts_and_creates_new_ones(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    await gql(
        'mutation { addExclusion(input: {value: "partner.test"}) { userErrors { code } } }',
        token=owner.token,
    )
    await gql(
        "mutation { updateWorkspaceSettings(input: {contactAutoCreation: SENT}) "
        "{ userErrors { code } } }",
        token=owner.token,
    )
    await factory.contact(owner, "pat@partner.test", "Pat")
    result = await send(
        gql, owner, mailbox_id, to=["pat@partner.test"], cc=["new.person@client.test"]
    )
    names = sorted(c["name"] or "" for c in result["email"]["contacts"])
    assert result["userErrors"] == []
    # R4's exception: Pat's domain is excluded, the CRM-sent email is still on Pat's
    # timeline; R5: the Cc became a contact, as the workspace's setting says for sent mail.
    assert len(names) == 2 and "Pat" in names


async def test_r15_email_delivery_changed_turns_sending_into_sent(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    ann = recipient(google)
    contact = await factory.contact(owner, ann, "Ann")
    async with subscribe(
        api.ws_url,
        owner.token,
        DELIVERY,
        {"m": to_global_id("Mailbox", mailbox_id)},
        subscribers=api.subscribers(owner.workspace.id),
    ) as sub:
        await send(gql, owner, mailbox_id, to=[ann], subject="Live")
        async with live_worker(runtime):
            event = (await sub.next())["data"]["emailDeliveryChanged"]
    timeline = await gql(
        "query($id: ID!) { contact(id: $id) { timeline { edges { cursor } } } }",
        {"id": to_global_id("Contact", contact.id)},
        token=owner.token,
    )
    assert event == {
        "email": {"subject": "Live", "deliveryStatus": "SENT"},
        "contacts": [{"name": "Ann"}],
        # where a timeline page puts it: an app inserts the email into its cached connection
        "cursor": timeline["contact"]["timeline"]["edges"][0]["cursor"],
    }


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (SyncMode.TWO_WAY, {"Started here", "Re: Started here", "Unrelated"}),
        (SyncMode.CRM_THREADS_ONLY, {"Started here", "Re: Started here"}),
        (SyncMode.ONE_WAY, {"Started here"}),
    ],
)
async def test_r12_every_mode_sends_and_files_what_it_should(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    mode: SyncMode,
    expected: set[str],
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    changed = await gql(
        "mutation($input: UpdateMailboxInput!) { updateMailbox(input: $input) "
        "{ userErrors { code } } }",
        {"input": {"id": to_global_id("Mailbox", mailbox_id), "syncMode": mode.value}},
        token=owner.token,
    )
    assert changed["updateMailbox"]["userErrors"] == []
    sent = await send(gql, owner, mailbox_id, to=[ann], subject="Started here")
    await drain(runtime)
    row = await stored(runtime, sent["email"]["id"])
    assert row.delivery_status == DeliveryStatus.SENT  # every mode sends
    # The contact answers the CRM email, and writes about something else.
    reply = raw_message(ann, [address], "Re: Started here", in_reply_to=row.message_id)
    await deliver(google, address, reply)
    await deliver(google, address, raw_message(ann, [address], "Unrelated"))
    await google.google.drain_pushes()
    await drain(runtime)
    subjects = {e.subject for e in await emails_of(runtime, owner.workspace.id)}
    assert subjects == expected
    assert (await reload_mailbox(runtime, mailbox_id)).status != MailboxStatus.ERROR


async def test_r15_a_transient_failure_is_retried_and_the_mail_sent_once(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    outage = google.google.faults.add(
        Fault(status=503, account=address, path="/messages/send", times=1)
    )
    result = await send(gql, owner, mailbox_id, to=[ann], subject="Second time lucky")
    await drain(runtime)  # the first attempt fails; the job comes back after its backoff
    assert outage.hits == 1
    row = await stored(runtime, result["email"]["id"])
    assert row.delivery_status == DeliveryStatus.SENT
    assert len(await inbox_of(google, ann)) == 1


async def test_r15_send_through_outlook_keeps_the_mime_and_the_sent_copy_is_stored_once(
    gql: GQL,
    factory: Factory,
    microsoft: SandboxServer,
    google: SandboxServer,
    runtime: Runtime,
) -> None:
    from tests.test_microsoft import connected as outlook_connected
    from tests.test_microsoft import settle as outlook_settle

    owner, mailbox_id, _ = await outlook_connected(gql, factory, microsoft, runtime)
    ann = await gmail_contact(
        factory, google, owner
    )  # a Gmail user: the sandboxes deliver to each other
    result = await send(gql, owner, mailbox_id, to=[ann], subject="From Outlook", bodyText="Hi")
    assert result["userErrors"] == []
    await drain(runtime)
    row = await stored(runtime, result["email"]["id"])
    assert row.delivery_status == DeliveryStatus.SENT
    (received,) = await inbox_of(google, ann)
    assert received[1]["Message-ID"].strip() == row.message_id
    assert received[1]["Subject"] == "From Outlook"
    await runtime.jobs.enqueue_sync(str(mailbox_id))
    await outlook_settle(microsoft, runtime)
    assert [e.id for e in await emails_of(runtime, owner.workspace.id)] == [row.id]


async def test_r15_a_queued_email_whose_job_was_lost_is_queued_again_and_sent_once(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    from datetime import timedelta

    from backend.kit import clock
    from backend.sending.jobs import requeue_unsent
    from backend.sending.queue import send_job_id
    from tests.worker import clear_queue

    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    result = await send(gql, owner, mailbox_id, to=[ann], subject="Not lost")
    job = send_job_id(str((await stored(runtime, result["email"]["id"])).id)).encode()

    async def queued() -> list[bytes]:
        return list(await runtime.redis.zrange("arq:queue", 0, -1))

    await clear_queue(runtime)  # Redis lost the job
    await requeue_unsent(runtime)
    assert job not in await queued()  # too young to call lost: its job may still be running
    clock.advance(timedelta(seconds=2 * runtime.settings.send_timeout_seconds + 1))
    await requeue_unsent(runtime)
    await requeue_unsent(runtime)
    assert (await queued()).count(job) == 1
    await drain(runtime)
    assert (await stored(runtime, result["email"]["id"])).delivery_status == DeliveryStatus.SENT
    assert len(await inbox_of(google, ann)) == 1


async def test_r15_gmail_daily_sending_limit_fails_the_email_with_its_code_and_send_failed(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime, api: LiveServer
) -> None:
    from tests.sync_helpers import error_codes

    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    google.google.ensure_account(address).daily_send_limit = 0
    async with subscribe(
        api.ws_url,
        owner.token,
        DELIVERY,
        {"m": to_global_id("Mailbox", mailbox_id)},
        subscribers=api.subscribers(owner.workspace.id),
    ) as sub:
        result = await send(gql, owner, mailbox_id, to=[ann], subject="Over the limit")
        assert result["userErrors"] == []
        async with live_worker(runtime):
            event = (await sub.next())["data"]["emailDeliveryChanged"]
    assert event["email"] == {"subject": "Over the limit", "deliveryStatus": "FAILED"}
    shown = await gql(EMAIL, {"id": result["email"]["id"]}, token=owner.token)
    assert shown["email"]["deliveryStatus"] == "FAILED"
    assert shown["email"]["deliveryError"].startswith("SEND_LIMIT_REACHED: ")
    assert "SEND_FAILED" in await error_codes(runtime, mailbox_id)
    assert await inbox_of(google, ann) == []


async def test_r15_graph_request_size_limit_is_a_user_error_before_anything_is_queued(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    from tests.test_microsoft import connected as outlook_connected

    owner, mailbox_id, _ = await outlook_connected(gql, factory, microsoft, runtime)
    big = await send(gql, owner, mailbox_id, to=["ann@client.test"], bodyText="x" * (3_500_000))
    assert [(e["field"], e["code"]) for e in big["userErrors"]] == [
        (["input", "bodyText"], "MESSAGE_TOO_LARGE")
    ]
    assert await emails_of(runtime, owner.workspace.id) == []


async def _a_lost_answer_is_found_not_sent_again(
    gql: GQL,
    factory: Factory,
    sandbox: Any,
    path: str,
    connected_mailbox: tuple[Member, uuid.UUID, str],
    google: SandboxServer,
    runtime: Runtime,
) -> None:
    """The provider files and delivers the message, then the worker gets a 503 instead of
    its answer: the retry finds the message in the mailbox and sends nothing more."""
    owner, mailbox_id, address = connected_mailbox
    ann = await gmail_contact(factory, google, owner)
    lost = sandbox.faults.add(
        Fault(status=503, after_delay_seconds=0, account=address, path=path, times=1)
    )
    result = await send(gql, owner, mailbox_id, to=[ann], subject="Lost answer")
    await drain(runtime)
    assert lost.hits == 1
    assert (await stored(runtime, result["email"]["id"])).delivery_status == DeliveryStatus.SENT
    assert len(await inbox_of(google, ann)) == 1


async def test_r15_a_lost_answer_after_gmail_accepted_the_mail_is_found_not_sent_again(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    mailbox = await connected(gql, factory, google, runtime)
    await _a_lost_answer_is_found_not_sent_again(
        gql, factory, google.google, "/messages/send", mailbox, google, runtime
    )


async def test_r15_a_lost_answer_after_graph_accepted_the_mail_is_found_not_sent_again(
    gql: GQL,
    factory: Factory,
    microsoft: SandboxServer,
    google: SandboxServer,
    runtime: Runtime,
) -> None:
    from tests.test_microsoft import connected as outlook_connected

    mailbox = await outlook_connected(gql, factory, microsoft, runtime)
    await _a_lost_answer_is_found_not_sent_again(
        gql, factory, microsoft.microsoft, "/sendMail", mailbox, google, runtime
    )


async def test_r15_r17_a_subject_on_two_lines_and_a_reply_to_unreadable_mail_are_refused(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, _ = await connected(gql, factory, google, runtime)
    split = await send(gql, owner, mailbox_id, to=["a@client.test"], subject="One\r\nBcc: x@y.z")
    assert [(e["field"], e["code"]) for e in split["userErrors"]] == [
        (["input", "subject"], "INVALID_ARGUMENT")
    ]
    # A colleague's mailbox shares only metadata: its mail is not the viewer's to answer.
    colleague = await factory.member(owner)
    theirs = await factory.mailbox(colleague, f"{unique('c')}@crm.test")
    await gql(
        "mutation($input: UpdateMailboxInput!) { updateMailbox(input: $input) "
        "{ userErrors { code } } }",
        {"input": {"id": to_global_id("Mailbox", theirs.id), "visibility": "METADATA_ONLY"}},
        token=colleague.token,
    )
    await factory.contact(owner, "kim@client.test", "Kim")
    private = await factory.email(
        colleague, theirs, raw_message("kim@client.test", [theirs.email_address], "Private")
    )
    reply = await send(
        gql,
        owner,
        mailbox_id,
        to=["kim@client.test"],
        inReplyToEmailId=to_global_id("Email", private.id),
    )
    assert [(e["field"], e["code"]) for e in reply["userErrors"]] == [
        (["input", "inReplyToEmailId"], "NOT_FOUND")
    ]
