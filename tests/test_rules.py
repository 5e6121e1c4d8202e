"""The filing rules of docs/rules.md, one test (at least) per rule, named after it.

Each drives the real ingest service with real MIME bytes; the pass-level rules (R6, R7 under
replays, R13) go through the sync pass with the provider double. Workspace settings, sync
modes and CRM-sent mail go through the GraphQL API, as users change them. The rules that the
issue 14 probing found gaps in are also pinned end to end in tests/test_filing.py.
"""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import select

from backend.auth.tables import Workspace
from backend.exclusions import service as exclusions_service
from backend.graphql.relay import to_global_id
from backend.kit import clock
from backend.mail.tables import EmailDirection, EmailSource, Thread
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import AccessDenied, MailboxNotFound, TransientProviderError
from backend.runtime import Runtime
from backend.sync import jobs
from backend.sync.ingest import Outcome
from backend.sync.jobs import run_pass
from tests.client import GQL
from tests.factories import Factory, Member, in_minutes, raw_message
from tests.providers import fake_provider
from tests.sync_helpers import (
    contacts_named,
    email_count,
    emails_with_message_id,
    error_codes,
    reload_mailbox,
    sightings,
    timeline_subjects,
)

SETTINGS = """
mutation($input: UpdateWorkspaceSettingsInput!) {
  updateWorkspaceSettings(input: $input) { userErrors { code } }
}"""
SYNC_MODE = """
mutation($id: ID!, $mode: SyncMode) {
  updateMailbox(input: {id: $id, syncMode: $mode}) { mailbox { syncMode } userErrors { code } }
}"""


async def _settings(gql: GQL, member: Member, **values: str) -> None:
    """Workspace settings as a user changes them: through the API."""
    body = await gql(SETTINGS, {"input": values}, token=member.token)
    assert body["updateWorkspaceSettings"]["userErrors"] == []


async def _sync_mode(gql: GQL, member: Member, mailbox: Mailbox, mode: str) -> None:
    body = await gql(
        SYNC_MODE, {"id": to_global_id("Mailbox", mailbox.id), "mode": mode}, token=member.token
    )
    assert body["updateMailbox"] == {"mailbox": {"syncMode": mode}, "userErrors": []}


# ---------------------------------------------------------------- R1
async def test_r1_a_users_address_is_never_matched_to_a_contact(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    impostor = await factory.contact(owner, teammate.email, "Contact with a user's address")
    client = await factory.contact(owner, "uma@client.test", "Uma")
    await factory.email(
        owner, mailbox, raw_message("uma@client.test", [owner.email], "Hi", cc=[teammate.email])
    )
    assert await timeline_subjects(runtime, client.id) == ["Hi"]
    assert await timeline_subjects(runtime, impostor.id) == []


async def test_r1_internal_mail_among_users_is_not_filed(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, teammate.email, "Same address as a user")
    result = await factory.ingest(mailbox, raw_message(teammate.email, [owner.email], "Lunch?"))
    assert result.outcome == Outcome.SKIPPED
    assert await email_count(runtime, owner.workspace.id) == 0


async def test_r1_mailbox_aliases_are_user_addresses(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    async with runtime.db.transaction() as session:
        row = await session.get(Mailbox, mailbox.id)
        assert row is not None
        row.aliases = ["sales@crm-alias.test"]
    alias_contact = await factory.contact(owner, "sales@crm-alias.test", "Alias")
    result = await factory.ingest(
        mailbox, raw_message("sales@crm-alias.test", ["vic@client.test"], "From my alias")
    )
    assert result.outcome == Outcome.SKIPPED  # no contact: the alias is the user, Vic is unknown
    assert await timeline_subjects(runtime, alias_contact.id) == []


# ---------------------------------------------------------------- R2
async def test_r2_matching_is_case_insensitive_with_idna_domains(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "Wes@Bücher.example", "Wes")
    await factory.email(
        owner, mailbox, raw_message("WES@xn--bcher-kva.EXAMPLE", [owner.email], "Punycode")
    )
    await factory.email(
        owner, mailbox, raw_message(" wes@BÜCHER.example ", [owner.email], "Unicode")
    )
    assert sorted(await timeline_subjects(runtime, contact.id)) == ["Punycode", "Unicode"]


async def test_r2_primary_email_only_ignores_additional_addresses(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "xia@main.test", "Xia", additional=["xia@side.test"])
    await factory.email(owner, mailbox, raw_message("xia@side.test", [owner.email], "All emails"))
    await _settings(gql, owner, contactMatching="PRIMARY_EMAIL_ONLY")
    skipped = await factory.ingest(
        mailbox, raw_message("xia@side.test", [owner.email], "Primary only")
    )
    assert skipped.outcome == Outcome.SKIPPED
    await factory.email(owner, mailbox, raw_message("xia@main.test", [owner.email], "Main address"))
    assert sorted(await timeline_subjects(runtime, contact.id)) == ["All emails", "Main address"]


async def test_r2_shared_address_files_on_the_earliest_created_contact(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    first = await factory.contact(owner, "yan@shared.test", "First")
    second = await factory.contact(owner, "yan@shared.test", "Second")
    await factory.email(
        owner, mailbox, raw_message("yan@shared.test", [owner.email], "Who gets it")
    )
    assert await timeline_subjects(runtime, first.id) == ["Who gets it"]
    assert await timeline_subjects(runtime, second.id) == []


async def test_r2_a_new_address_affects_mail_from_then_on(
    factory: Factory, runtime: Runtime
) -> None:
    from backend.contacts import service as contacts_service

    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "zoe@old.test", "Zoe")
    before = await factory.ingest(mailbox, raw_message("zoe@new.test", [owner.email], "Before"))
    assert before.outcome == Outcome.SKIPPED
    async with runtime.db.transaction() as session:
        await contacts_service.update_contact(
            session, owner.viewer, contact.id, additional_emails=["zoe@new.test"]
        )
    await factory.email(owner, mailbox, raw_message("zoe@new.test", [owner.email], "After"))
    assert await timeline_subjects(runtime, contact.id) == ["After"]


# ---------------------------------------------------------------- R3
async def test_r3_bcc_contacts_never_file(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    seen = await factory.contact(owner, "abe@client.test", "Abe")
    hidden = await factory.contact(owner, "bea@client.test", "Bea")
    only_bcc = await factory.ingest(
        mailbox, raw_message(owner.email, ["cal@unknown.test"], "Bcc only", bcc=["bea@client.test"])
    )
    assert only_bcc.outcome == Outcome.SKIPPED
    await factory.email(
        owner,
        mailbox,
        raw_message(owner.email, ["abe@client.test"], "To Abe", bcc=["bea@client.test"]),
    )
    assert await timeline_subjects(runtime, seen.id) == ["To Abe"]
    assert await timeline_subjects(runtime, hidden.id) == []


# ---------------------------------------------------------------- R4
async def _exclude(factory: Factory, member: Member, value: str) -> None:
    async with factory.db.transaction() as session:
        await exclusions_service.add_exclusion(session, member.viewer, value)


async def test_r4_excluded_from_or_to_is_not_filed_at_all(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "dee@client.test", "Dee")
    await _exclude(factory, owner, "spam.example")
    from_excluded = await factory.ingest(
        mailbox,
        raw_message("bot@mail.spam.example", [owner.email], "Sub-domain", cc=["dee@client.test"]),
    )
    to_excluded = await factory.ingest(
        mailbox, raw_message(owner.email, ["x@spam.example", "dee@client.test"], "To excluded")
    )
    assert from_excluded.outcome == to_excluded.outcome == Outcome.SKIPPED
    assert await timeline_subjects(runtime, contact.id) == []
    assert await email_count(runtime, owner.workspace.id) == 0


async def test_r4_cc_only_exclusions_file_for_the_other_contacts(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    kept = await factory.contact(owner, "eve@client.test", "Eve")
    excluded = await factory.contact(owner, "fox@hidden.test", "Fox")
    await _exclude(factory, owner, "fox@hidden.test")
    await factory.email(
        owner,
        mailbox,
        raw_message("eve@client.test", [owner.email], "Cc excluded", cc=["fox@hidden.test"]),
    )
    assert await timeline_subjects(runtime, kept.id) == ["Cc excluded"]
    assert await timeline_subjects(runtime, excluded.id) == []
    only_excluded = await factory.ingest(
        mailbox,
        raw_message(owner.email, ["gil@nobody.test"], "Only excluded cc", cc=["fox@hidden.test"]),
    )
    assert only_excluded.outcome == Outcome.SKIPPED


async def test_r4_a_contact_with_sync_off_has_its_addresses_excluded(
    factory: Factory, runtime: Runtime
) -> None:
    from backend.contacts import service as contacts_service

    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    quiet = await factory.contact(owner, "hal@client.test", "Hal", additional=["hal@home.test"])
    async with runtime.db.transaction() as session:
        await contacts_service.set_email_sync(session, owner.viewer, quiet.id, False)
    result = await factory.ingest(mailbox, raw_message("hal@home.test", [owner.email], "Off"))
    assert result.outcome == Outcome.SKIPPED
    async with runtime.db.transaction() as session:
        await contacts_service.set_email_sync(session, owner.viewer, quiet.id, True)
    await factory.email(owner, mailbox, raw_message("hal@home.test", [owner.email], "On again"))
    assert await timeline_subjects(runtime, quiet.id) == [
        "On again"
    ]  # nothing missed is backfilled


async def test_r4_crm_sent_mail_is_filed_even_on_excluded_contacts(
    factory: Factory, runtime: Runtime
) -> None:
    from backend.sync.filing import decide
    from backend.sync.ingest import filing_context
    from backend.sync.parsing import parse_message

    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "ivy@client.test", "Ivy")
    await _exclude(factory, owner, "client.test")
    parsed = parse_message(raw_message(owner.email, ["ivy@client.test"], "Sent from the CRM"))
    async with runtime.db.sessionmaker() as session:
        box = await session.get(Mailbox, mailbox.id)
        workspace = await session.get(Workspace, owner.workspace.id)
        assert box is not None and workspace is not None
        ctx = await filing_context(session, workspace, box)
    assert decide(parsed, ctx, EmailSource.SYNC).skip_reason == "excluded participant"
    assert decide(parsed, ctx, EmailSource.CRM).candidates == ["ivy@client.test"]


async def test_r4_removing_an_exclusion_resumes_filing(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "jan@client.test", "Jan")
    async with factory.db.transaction() as session:
        exclusion = await exclusions_service.add_exclusion(session, owner.viewer, "jan@client.test")
    assert (
        await factory.ingest(mailbox, raw_message("jan@client.test", [owner.email], "Missed"))
    ).outcome == Outcome.SKIPPED
    async with factory.db.transaction() as session:
        await exclusions_service.remove_exclusion(session, owner.viewer, exclusion.id)
    await factory.email(owner, mailbox, raw_message("jan@client.test", [owner.email], "Resumed"))
    assert await timeline_subjects(runtime, contact.id) == ["Resumed"]


# ---------------------------------------------------------------- R5
async def test_r5_mail_without_a_contact_is_not_stored(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    result = await factory.ingest(
        mailbox, raw_message("kai@stranger.test", [owner.email], "Who are you")
    )
    assert result.outcome == Outcome.SKIPPED and result.reason == "no contact"
    assert await email_count(runtime, owner.workspace.id) == 0


async def test_r5_auto_creation_sent_creates_recipients_of_sent_mail_only(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await _settings(gql, owner, contactAutoCreation="SENT")
    received = await factory.ingest(
        mailbox, raw_message("Lea <lea@new.test>", [owner.email], "Received")
    )
    assert received.outcome == Outcome.SKIPPED
    sent = await factory.ingest(
        mailbox,
        raw_message(
            owner.email, ["Max Mustermann <max@new.test>"], "Sent", cc=["noreply@new.test"]
        ),
    )
    assert sent.outcome == Outcome.FILED
    assert await contacts_named(runtime, owner.workspace.id) == {"max@new.test": "Max Mustermann"}


async def test_r5_auto_creation_sent_and_received(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await _settings(gql, owner, contactAutoCreation="SENT_AND_RECEIVED")
    await factory.email(
        owner, mailbox, raw_message("Ned <ned@new.test>", [owner.email], "Received")
    )
    assert await contacts_named(runtime, owner.workspace.id) == {"ned@new.test": "Ned"}


async def test_r5_never_auto_creates_from_bulk_or_no_reply_mail(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await _settings(gql, owner, contactAutoCreation="SENT_AND_RECEIVED")
    bulk = raw_message("news@letters.test", [owner.email], "Newsletter").replace(
        b"Subject:", b"List-Unsubscribe: <mailto:unsub@letters.test>\r\nSubject:", 1
    )
    auto = raw_message("robot@alerts.test", [owner.email], "Alert").replace(
        b"Subject:", b"Auto-Submitted: auto-generated\r\nSubject:", 1
    )
    for raw in (bulk, auto, raw_message("no-reply@shop.test", [owner.email], "Receipt")):
        assert (await factory.ingest(mailbox, raw)).outcome == Outcome.SKIPPED
    assert await contacts_named(runtime, owner.workspace.id) == {}


# ---------------------------------------------------------------- R6
async def test_r6_mail_dated_before_the_connection_is_not_filed(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner, connected_at=clock.now())
    contact = await factory.contact(owner, "oli@client.test", "Oli")
    old = await factory.ingest(
        mailbox,
        raw_message("oli@client.test", [owner.email], "Old", date=clock.now() - timedelta(days=3)),
    )
    assert old.outcome == Outcome.SKIPPED
    await factory.email(
        owner, mailbox, raw_message("oli@client.test", [owner.email], "New", date=in_minutes(5))
    )
    assert await timeline_subjects(runtime, contact.id) == ["New"]


# ---------------------------------------------------------------- R7
async def test_r7_replays_store_once(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "pam@client.test", "Pam")
    raw = raw_message("pam@client.test", [owner.email], "Once", message_id="<once@client.test>")
    first = await factory.ingest(mailbox, raw, provider_id="p1")
    again = await factory.ingest(mailbox, raw, provider_id="p1")
    moved = await factory.ingest(mailbox, raw, provider_id="p1-after-move")
    assert first.outcome == Outcome.FILED and again.outcome == moved.outcome == Outcome.DUPLICATE
    assert len(await emails_with_message_id(runtime, owner.workspace.id, "<once@client.test>")) == 1
    assert await timeline_subjects(runtime, contact.id) == ["Once"]


async def test_r7_mail_without_message_id_is_deduplicated_by_provider_id(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "quy@client.test", "Quy")
    raw = raw_message("quy@client.test", [owner.email], "No id").replace(
        b"Message-ID:", b"X-Old-Message-ID:", 1
    )
    assert (await factory.ingest(mailbox, raw, provider_id="no-id-1")).outcome == Outcome.FILED
    assert (await factory.ingest(mailbox, raw, provider_id="no-id-1")).outcome == Outcome.DUPLICATE
    assert await timeline_subjects(runtime, contact.id) == ["No id"]


async def test_r7_two_mailboxes_of_a_workspace_store_once_and_file_once_per_contact(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mine = await factory.mailbox(owner)
    theirs = await factory.mailbox(teammate)
    ron = await factory.contact(owner, "ron@client.test", "Ron")
    raw = raw_message(
        "ron@client.test",
        [owner.email, teammate.email],
        "To both of us",
        message_id="<both@client.test>",
    )
    with fake_provider() as store:
        store.deliver(mine.email_address, raw)
        store.deliver(theirs.email_address, raw)
        import asyncio

        results = await asyncio.gather(run_pass(runtime, mine.id), run_pass(runtime, theirs.id))
    assert sorted(r.filed for r in results if r) == [0, 1]
    stored = await emails_with_message_id(runtime, owner.workspace.id, "<both@client.test>")
    assert len(stored) == 1
    assert await timeline_subjects(runtime, ron.id) == ["To both of us"]
    assert await sightings(runtime, stored[0].id) == 2


# ---------------------------------------------------------------- R8
async def test_r8_direction_and_sent_by(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "sue@client.test", "Sue")
    incoming = await factory.email(
        owner, mailbox, raw_message("sue@client.test", [owner.email], "In")
    )
    outgoing = await factory.email(
        owner, mailbox, raw_message(owner.email, ["sue@client.test"], "Out")
    )
    # A teammate's address is an own address of the workspace too, even in another's mailbox.
    teammates = await factory.email(
        owner,
        mailbox,
        raw_message(teammate.email, ["sue@client.test"], "Teammate", cc=[owner.email]),
    )
    assert incoming.direction == EmailDirection.INCOMING
    assert outgoing.direction == teammates.direction == EmailDirection.OUTGOING
    assert incoming.sent_by_id == outgoing.sent_by_id == owner.user.id  # whose mailbox synced it


async def test_r8_the_senders_own_copy_makes_the_email_theirs(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    sender = await factory.member(owner)
    copied = await factory.mailbox(owner)
    senders = await factory.mailbox(sender)
    await factory.contact(owner, "una@client.test", "Una")
    raw = raw_message(
        sender.email,
        ["una@client.test"],
        "Sent by a teammate",
        cc=[owner.email],
        message_id="<theirs@team.test>",
    )
    # The copied colleague's mailbox syncs first; the sender's Sent copy arrives later.
    assert (await factory.ingest(copied, raw, provider_id="cc-copy")).outcome == Outcome.FILED
    first = (await emails_with_message_id(runtime, owner.workspace.id, "<theirs@team.test>"))[0]
    assert (first.mailbox_id, first.sent_by_id) == (copied.id, owner.user.id)
    assert (await factory.ingest(senders, raw, provider_id="sent")).outcome == Outcome.DUPLICATE
    stored = await emails_with_message_id(runtime, owner.workspace.id, "<theirs@team.test>")
    assert len(stored) == 1
    assert (stored[0].mailbox_id, stored[0].sent_by_id) == (senders.id, sender.user.id)
    # A later sighting by the colleague does not take it back.
    assert (await factory.ingest(copied, raw, provider_id="cc-moved")).outcome == Outcome.DUPLICATE
    again = await emails_with_message_id(runtime, owner.workspace.id, "<theirs@team.test>")
    assert again[0].sent_by_id == sender.user.id


# ---------------------------------------------------------------- R9
async def test_r9_provider_thread_ids_group_a_mailboxs_mail(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "tom@client.test", "Tom")
    first = await factory.ingest(
        mailbox,
        raw_message("tom@client.test", [owner.email], "Topic A", date=in_minutes(1)),
        thread_id="T1",
    )
    second = await factory.ingest(
        mailbox,
        raw_message("tom@client.test", [owner.email], "Different subject", date=in_minutes(2)),
        thread_id="T1",
    )
    other = await factory.ingest(
        mailbox,
        raw_message("tom@client.test", [owner.email], "Topic A", date=in_minutes(3)),
        thread_id="T2",
    )
    async with runtime.db.sessionmaker() as session:
        from backend.mail.tables import Email

        rows = {
            e.id: e.thread_id
            for e in await session.scalars(
                select(Email).where(Email.workspace_id == owner.workspace.id)
            )
        }
        threads = {
            t.id: t
            for t in await session.scalars(
                select(Thread).where(Thread.workspace_id == owner.workspace.id)
            )
        }
    assert rows[first.email_id] == rows[second.email_id]  # type: ignore[index]
    assert rows[other.email_id] != rows[first.email_id]  # type: ignore[index]  # subject alone never joins
    assert threads[rows[first.email_id]].email_count == 2  # type: ignore[index]


async def test_r9_in_reply_to_joins_threads_across_mailboxes(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mine = await factory.mailbox(owner)
    theirs = await factory.mailbox(teammate)
    await factory.contact(owner, "uli@client.test", "Uli")
    question = await factory.email(
        owner,
        mine,
        raw_message(
            "uli@client.test",
            [owner.email],
            "Question",
            message_id="<q@client.test>",
            date=in_minutes(1),
        ),
    )
    answer = await factory.email(
        teammate,
        theirs,
        raw_message(
            teammate.email,
            ["uli@client.test"],
            "Answer",
            in_reply_to="<q@client.test>",
            date=in_minutes(2),
        ),
    )
    assert answer.thread_id == question.thread_id


# ---------------------------------------------------------------- R10
async def test_r10_attachments_bodies_and_snippet(factory: Factory, runtime: Runtime) -> None:
    from email.message import EmailMessage

    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "val@client.test", "Val")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "val@client.test", owner.email, "Files"
    msg["Date"] = "Tue, 24 Nov 2099 10:00:00 +0000"
    msg["Message-ID"] = "<files@client.test>"
    msg.set_content("word " * 100)
    msg.add_alternative(
        '<p onclick="x()">Hi <script>alert(1)</script><img src="cid:logo"></p>', subtype="html"
    )
    msg.get_payload()[1].add_related(b"\x89PNG....", maintype="image", subtype="png", cid="<logo>")
    msg.add_attachment(
        b"%PDF-1.4 " * 100, maintype="application", subtype="pdf", filename="quote.pdf"
    )
    email = await factory.email(owner, mailbox, msg.as_bytes())
    assert email.attachments == [
        {"filename": "quote.pdf", "content_type": "application/pdf", "size": 900}
    ]
    assert (
        email.body_html is not None
        and "script" not in email.body_html
        and "onclick" not in email.body_html
    )
    assert (
        email.snippet is not None
        and len(email.snippet) == 200
        and email.snippet.startswith("word word")
    )
    assert email.body_text is not None and email.body_text.startswith("word ")


# ---------------------------------------------------------------- R11
async def test_r11_mail_gone_from_the_mailbox_stays_in_the_crm(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "wil@client.test", "Wil")
    with fake_provider() as store:
        store.deliver(
            mailbox.email_address, raw_message("wil@client.test", [owner.email], "Keep me")
        )
        await run_pass(runtime, mailbox.id)
        store.messages[mailbox.email_address].clear()  # deleted in the mailbox
        await run_pass(runtime, mailbox.id)
    assert await timeline_subjects(runtime, contact.id) == ["Keep me"]


# ---------------------------------------------------------------- R12
async def test_r12_one_way_files_nothing_from_the_mailbox(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "xan@client.test")
    await _sync_mode(gql, owner, mailbox, "ONE_WAY")
    result = await factory.ingest(mailbox, raw_message("xan@client.test", [owner.email], "Ignored"))
    assert result.outcome == Outcome.SKIPPED and result.reason == "mailbox syncs one way"


async def test_r12_crm_threads_only_files_replies_in_crm_threads(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "yul@client.test", "Yul")
    await _sync_mode(gql, owner, mailbox, "CRM_THREADS_ONLY")
    # A thread started from the CRM: filed at once (QUEUED), whatever the send does later.
    sent = await gql(
        """mutation($input: SendEmailInput!) {
          sendEmail(input: $input) { email { messageId } userErrors { code } }
        }""",
        {
            "input": {
                "mailboxId": to_global_id("Mailbox", mailbox.id),
                "to": ["yul@client.test"],
                "subject": "Offer",
                "bodyText": "Our offer",
            }
        },
        token=owner.token,
    )
    assert sent["sendEmail"]["userErrors"] == []
    offer_id = sent["sendEmail"]["email"]["messageId"]
    unrelated = await factory.ingest(
        mailbox, raw_message("yul@client.test", [owner.email], "Unrelated")
    )
    assert unrelated.outcome == Outcome.SKIPPED
    reply = await factory.ingest(
        mailbox,
        raw_message(
            "yul@client.test",
            [owner.email],
            "Re: Offer",
            in_reply_to=offer_id,
            date=in_minutes(1),
        ),
    )
    assert reply.outcome == Outcome.FILED
    assert sorted(await timeline_subjects(runtime, contact.id)) == ["Offer", "Re: Offer"]


# ---------------------------------------------------------------- R13
async def test_r13_pending_until_the_first_filed_email_then_active(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "zed@client.test")
    with fake_provider() as store:
        await run_pass(runtime, mailbox.id)
        assert (await reload_mailbox(runtime, mailbox.id)).status == MailboxStatus.PENDING
        store.deliver(mailbox.email_address, raw_message("zed@client.test", [owner.email], "First"))
        await run_pass(runtime, mailbox.id)
    row = await reload_mailbox(runtime, mailbox.id)
    assert row.status == MailboxStatus.ACTIVE
    assert row.last_synced_at is not None and row.last_email_synced_at is not None


async def test_r13_errors_back_off_and_suspend_after_48_hours(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    with fake_provider() as store:
        store.fail_with(mailbox.email_address, TransientProviderError("503 from provider"))
        await run_pass(runtime, mailbox.id)
        first = await reload_mailbox(runtime, mailbox.id)
        assert first.status == MailboxStatus.ERROR and first.next_attempt_at is not None
        clock.advance(timedelta(minutes=5))
        await run_pass(runtime, mailbox.id)
        second = await reload_mailbox(runtime, mailbox.id)
        assert second.next_attempt_at is not None
        assert (second.next_attempt_at - clock.now()) > (
            first.next_attempt_at - first.failing_since
        )  # type: ignore[operator]
        clock.advance(timedelta(hours=48))
        await run_pass(runtime, mailbox.id)
        suspended = await reload_mailbox(runtime, mailbox.id)
        assert suspended.status == MailboxStatus.SUSPENDED and suspended.next_attempt_at is None
        store.failures.clear()
        assert await run_pass(runtime, mailbox.id) is None  # no more passes until reconnected
        await jobs.schedule_due(runtime)
        assert b"sync:" + str(mailbox.id).encode() not in await runtime.redis.zrange(
            "arq:queue", 0, -1
        )
    assert await error_codes(runtime, mailbox.id) == ["PROVIDER_UNAVAILABLE"] * 3


async def test_r13_permanent_errors_carry_their_code_and_recovery_clears_them(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    with fake_provider() as store:
        store.fail_with(mailbox.email_address, MailboxNotFound("MailboxNotEnabledForRESTAPI"))
        await run_pass(runtime, mailbox.id)
        store.fail_with(mailbox.email_address, AccessDenied("401"))
        await run_pass(runtime, mailbox.id)
        store.failures.clear()
        await run_pass(runtime, mailbox.id)
    row = await reload_mailbox(runtime, mailbox.id)
    assert row.status == MailboxStatus.PENDING and row.failing_since is None
    assert await error_codes(runtime, mailbox.id) == ["MAILBOX_NOT_FOUND", "ACCESS_DENIED"]


async def test_r13_a_missing_provider_is_a_read_failure_not_a_crash(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    from backend.providers import registry
    from backend.providers.base import Provider

    previous = registry.factory_for(Provider.GMAIL)
    registry.unregister(Provider.GMAIL)
    try:
        result = await run_pass(runtime, mailbox.id)
    finally:
        if previous is not None:
            registry.register(Provider.GMAIL, previous)
    assert result is not None and result.error is not None
    assert await error_codes(runtime, mailbox.id) == ["READ_FAILED"]
