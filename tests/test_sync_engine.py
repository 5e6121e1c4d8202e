"""Sync pass safety: a killed pass loses nothing and files nothing twice; broken mail never
crashes a pass; every filed email is announced exactly once."""

from __future__ import annotations

import asyncio

import pytest

from backend.mailboxes.tables import MailboxStatus
from backend.providers.base import SyncErrorCode
from backend.runtime import Runtime
from backend.sync import service as sync_service
from backend.sync.jobs import run_pass
from tests.corpus.malformed import CONTACT, MESSAGES, USER
from tests.event_stream import StreamReader
from tests.factories import Factory, raw_message
from tests.providers import fake_provider
from tests.sync_helpers import email_count, error_codes, reload_mailbox, timeline_subjects


async def test_a_pass_killed_between_fetching_and_committing_loses_nothing(
    factory: Factory, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "ada@client.test", "Ada")
    original = sync_service._succeeded

    def killed(*args: object, **kwargs: object) -> None:
        # Everything is fetched and filed in the session, nothing is committed yet.
        raise asyncio.CancelledError("worker killed")

    with fake_provider() as store:
        for i in range(5):
            store.deliver(
                mailbox.email_address, raw_message("ada@client.test", [owner.email], f"M{i}")
            )
        monkeypatch.setattr(sync_service, "_succeeded", killed)
        with pytest.raises(asyncio.CancelledError):
            await run_pass(runtime, mailbox.id)
        assert await email_count(runtime, owner.workspace.id) == 0
        assert (await reload_mailbox(runtime, mailbox.id)).cursor is None
        monkeypatch.setattr(sync_service, "_succeeded", original)
        store.deliver(mailbox.email_address, raw_message("ada@client.test", [owner.email], "M5"))
        result = await run_pass(runtime, mailbox.id)
        assert result is not None and result.filed == 6
        again = await run_pass(runtime, mailbox.id)  # the cursor moved with the mail
        assert again is not None and again.filed == 0 and again.duplicates == 0
    assert sorted(await timeline_subjects(runtime, contact.id)) == [f"M{i}" for i in range(6)]


async def test_replaying_a_whole_mailbox_files_nothing_twice(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "bob@client.test", "Bob")
    with fake_provider() as store:
        for i in range(3):
            store.deliver(
                mailbox.email_address, raw_message("bob@client.test", [owner.email], f"R{i}")
            )
        await run_pass(runtime, mailbox.id)
        # The provider lost our cursor (Gmail 404, Graph 410): it lists everything again.
        async with runtime.db.transaction() as session:
            from backend.mailboxes.tables import Mailbox

            row = await session.get(Mailbox, mailbox.id)
            assert row is not None
            row.cursor = None
        replay = await run_pass(runtime, mailbox.id)
    assert replay is not None and replay.filed == 0 and replay.duplicates == 3
    assert len(await timeline_subjects(runtime, contact.id)) == 3


async def test_every_filed_email_is_announced_exactly_once(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mine = await factory.mailbox(owner)
    theirs = await factory.mailbox(teammate)
    await factory.contact(owner, "cat@client.test", "Cat")
    stream = await StreamReader(runtime.settings.redis_url, owner.workspace.id).start()
    raw = raw_message(
        "cat@client.test",
        [owner.email, teammate.email],
        "Shared",
        message_id="<shared-cat@client.test>",
    )
    with fake_provider() as store:
        store.deliver(mine.email_address, raw)
        store.deliver(theirs.email_address, raw)
        await asyncio.gather(run_pass(runtime, mine.id), run_pass(runtime, theirs.id))
        await run_pass(runtime, mine.id)
    events: list[dict[str, object]] = []
    async with asyncio.timeout(30):
        while len([e for e in events if e["type"] == "syncPassCompleted"]) < 3:
            events += await stream.read(block_ms=1000)
    await stream.aclose()
    assert [e["type"] for e in events].count("emailReceived") == 1


@pytest.mark.parametrize("name", sorted(MESSAGES))
async def test_malformed_message_is_filed_or_recorded_never_a_crash(
    name: str, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner, USER.replace("@", f"+{abs(hash(name))}@"))
    async with runtime.db.transaction() as session:
        from backend.mailboxes.tables import Mailbox

        row = await session.get(Mailbox, mailbox.id)
        assert row is not None
        row.aliases = [USER]  # the corpus writes to USER
        row.connected_at = row.connected_at.replace(
            year=2000
        )  # some corpus mail has no usable date
    contact = await factory.contact(owner, CONTACT, "Corpus")
    with fake_provider() as store:
        store.deliver(mailbox.email_address, MESSAGES[name])
        result = await run_pass(runtime, mailbox.id)
    assert result is not None and result.error is None
    assert (await reload_mailbox(runtime, mailbox.id)).status != MailboxStatus.ERROR
    filed = len(await timeline_subjects(runtime, contact.id))
    failed = (await error_codes(runtime, mailbox.id)).count("IMPORT_FAILED")
    assert (filed, failed) in {(1, 0), (0, 1)}, (filed, failed)
    assert result.filed + result.failed == 1


async def test_a_pass_over_the_timeout_is_recorded_and_retried(
    factory: Factory, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arq cancelled an overrunning pass: nothing was recorded (R13) and nothing retried it."""
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "tim@client.test", "Tim")
    original = sync_service.list_changes
    never = asyncio.Event()

    async def stuck(*args: object, **kwargs: object) -> None:
        await never.wait()

    monkeypatch.setattr(runtime.settings, "sync_pass_timeout_seconds", 2)
    with fake_provider() as store:
        store.deliver(mailbox.email_address, raw_message("tim@client.test", [owner.email], "T"))
        monkeypatch.setattr(sync_service, "list_changes", stuck)
        # A generous outer bound: without its own limit the pass would wait forever.
        result = await asyncio.wait_for(run_pass(runtime, mailbox.id), 60)
        assert result is not None and result.error is not None
        assert result.error.code == SyncErrorCode.PROVIDER_UNAVAILABLE
        assert await error_codes(runtime, mailbox.id) == ["PROVIDER_UNAVAILABLE"]
        row = await reload_mailbox(runtime, mailbox.id)
        assert row.status == MailboxStatus.ERROR and row.next_attempt_at is not None
        async with runtime.db.sessionmaker() as session:
            later = await sync_service.due_mailboxes(session, 300)
        assert mailbox.id not in later  # backing off, then retried by the scheduler:
        monkeypatch.setattr(sync_service, "now", lambda: row.next_attempt_at)
        async with runtime.db.sessionmaker() as session:
            assert mailbox.id in await sync_service.due_mailboxes(session, 300)
        monkeypatch.setattr(sync_service, "list_changes", original)
        retried = await run_pass(runtime, mailbox.id)
        assert retried is not None and retried.error is None and retried.filed == 1
    assert await timeline_subjects(runtime, contact.id) == ["T"]
