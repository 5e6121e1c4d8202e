"""A pass writes in many short transactions over minutes: what changed meanwhile (a
disconnect, a reconnect, an exclusion) must hold against what the pass loaded at its start."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import col, select

from backend.graphql.relay import to_global_id
from backend.kit.crypto import encrypt_json
from backend.mailboxes import connect
from backend.mailboxes.service import read_credentials
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.providers.base import (
    MailProvider,
    MessageRef,
    SentMessage,
    TransientProviderError,
)
from backend.providers.oauth import ConnectedAccount
from backend.runtime import Runtime
from backend.sending import jobs as sending_jobs
from backend.settings import Settings
from backend.sync import jobs, service
from backend.sync.jobs import run_pass
from backend.sync.service import FETCH_BATCH
from backend.sync.tables import SyncBacklog
from tests.client import GQL
from tests.factories import Factory, raw_message, unique
from tests.sandbox import SandboxServer
from tests.sync_helpers import email_count, reload_mailbox, timeline_subjects, wait_until
from tests.test_gmail import DISCONNECT, RECONNECT, deliver, follow_consent
from tests.test_gmail import connected as connected_gmail
from tests.test_microsoft import connected as connected_outlook
from tests.worker import drain


async def backlog_size(runtime: Runtime, mailbox_id: uuid.UUID) -> int:
    async with runtime.db.sessionmaker() as session:
        count = await session.scalar(
            select(sa.func.count()).where(SyncBacklog.mailbox_id == mailbox_id)
        )
    return int(count or 0)


async def a_pass_saved_its_backlog_and_died(runtime: Runtime, mailbox_id: uuid.UUID) -> None:
    """What a pass does before filing a large change set: the backlog saved and the cursor
    moved past it, in one transaction."""
    mailbox = await reload_mailbox(runtime, mailbox_id)
    provider = service.provider_for_mailbox(runtime.settings, mailbox)
    try:
        changes = await service.list_changes(provider, mailbox)
    finally:
        await provider.close()
    async with runtime.unit_of_work() as work:
        saved = await service.save_backlog(
            work.session, mailbox, changes, mailbox.credentials_encrypted
        )
    assert saved is not None and len(saved) == len(changes.refs)


async def test_r6_a_disconnect_keeps_the_backlog_so_a_reconnect_files_it(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    """Disconnecting deleted the backlog but kept the cursor past it: reconnecting the same
    account resumed after mail nobody had filed."""
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    await factory.contact(owner, "kim@client.test", "Kim")
    for i in range(3):
        await deliver(google, address, raw_message("kim@client.test", [address], f"M{i}"))
    await a_pass_saved_its_backlog_and_died(runtime, mailbox_id)

    gid = to_global_id("Mailbox", mailbox_id)
    await gql(DISCONNECT, {"id": gid}, token=owner.token)
    await drain(runtime)
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.status == MailboxStatus.DISCONNECTED and mailbox.credentials_encrypted is None
    assert await backlog_size(runtime, mailbox_id) == 3

    url = (await gql(RECONNECT, {"id": gid}, token=owner.token))["reconnectMailbox"][
        "authorizationUrl"
    ]
    landed = await follow_consent(url)
    assert landed["mailboxId"] == [gid]
    await drain(runtime)
    assert await email_count(runtime, owner.workspace.id) == 3
    assert await backlog_size(runtime, mailbox_id) == 0


async def test_r6_reconnecting_another_address_drops_the_old_accounts_backlog(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    for i in range(2):
        await deliver(google, address, raw_message("kim@client.test", [address], f"M{i}"))
    await a_pass_saved_its_backlog_and_died(runtime, mailbox_id)
    assert await backlog_size(runtime, mailbox_id) == 2
    other = ConnectedAccount(
        email_address=f"other-{address}",
        aliases=[],
        credentials={"access_token": "a", "refresh_token": "r"},
        cursor={"historyId": "1"},
    )
    async with runtime.unit_of_work() as work:
        mailbox = await work.session.get(Mailbox, mailbox_id)
        assert mailbox is not None
        await connect._reconnect(
            work.session, work.effects, runtime.settings, owner.viewer, mailbox, other
        )
    assert await backlog_size(runtime, mailbox_id) == 0
    assert (await reload_mailbox(runtime, mailbox_id)).cursor == {"historyId": "1"}


async def test_r4_an_exclusion_added_during_a_pass_holds_for_its_later_batches(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The filing rules were read once per pass: batches filed after an exclusion with
    purgeExisting put back the mail it had just unfiled."""
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    kim = await factory.contact(owner, "kim@client.test", "Kim")
    for i in range(FETCH_BATCH + 5):
        await deliver(google, address, raw_message("kim@client.test", [address], f"M{i}"))
    real = jobs.fetch_and_parse
    calls = 0

    async def exclude_before_the_second_batch(
        provider: MailProvider, refs: Sequence[MessageRef], processes: int
    ) -> list[service.Prepared]:
        nonlocal calls
        calls += 1
        prepared = await real(provider, refs, processes)
        if calls == 2:

            async def first_batch_filed() -> bool:
                return await email_count(runtime, owner.workspace.id) == FETCH_BATCH

            await wait_until(first_batch_filed, 120)
            body = await gql(
                """mutation($v: String!) { addExclusion(input: {value: $v, purgeExisting: true})
                   { userErrors { code } } }""",
                {"v": "kim@client.test"},
                token=owner.token,
            )
            assert body["addExclusion"]["userErrors"] == []
        return prepared

    monkeypatch.setattr(jobs, "fetch_and_parse", exclude_before_the_second_batch)
    result = await run_pass(runtime, mailbox_id)
    assert result is not None and result.error is None
    assert calls == 2
    assert result.filed == FETCH_BATCH  # the second batch filed nothing
    assert await timeline_subjects(runtime, kim.id) == []


async def test_r6_a_reconnect_during_a_pass_keeps_its_cursor_and_credentials(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pass's last write checked only that the mailbox still synced: it put the old
    connection's cursor over the one the reconnect had just written."""
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    await factory.contact(owner, "kim@client.test", "Kim")
    await deliver(google, address, raw_message("kim@client.test", [address], "Hello"))
    new_credentials = {"access_token": "new", "refresh_token": "new"}
    sealed = encrypt_json(runtime.settings.secret, new_credentials)
    real = jobs.fetch_and_parse

    async def reconnected_meanwhile(
        provider: MailProvider, refs: Sequence[MessageRef], processes: int
    ) -> list[service.Prepared]:
        prepared = await real(provider, refs, processes)
        async with runtime.unit_of_work() as work:
            await work.session.execute(
                sa.update(Mailbox)
                .where(col(Mailbox.id) == mailbox_id)
                .values(credentials_encrypted=sealed, cursor={"historyId": "424242"})
            )
        return prepared

    monkeypatch.setattr(jobs, "fetch_and_parse", reconnected_meanwhile)
    assert await run_pass(runtime, mailbox_id) is None
    mailbox = await reload_mailbox(runtime, mailbox_id)
    assert mailbox.cursor == {"historyId": "424242"}
    assert read_credentials(runtime.settings.secret, mailbox) == new_credentials
    assert await email_count(runtime, owner.workspace.id) == 0  # the next pass files it


@pytest.mark.parametrize("fails", [False, True])
async def test_r13_a_pass_that_rotated_the_token_itself_still_records_its_outcome(
    gql: GQL,
    factory: Factory,
    microsoft: SandboxServer,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    fails: bool,
) -> None:
    """The pass's own token rotation changes the row's credentials too: it must not be taken
    for a reconnect, and the token the store saved is the one that stays."""
    owner, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
    await factory.contact(owner, "kim@client.test", "Kim")
    microsoft.microsoft.deliver(address, raw_message("kim@client.test", [address], "Hello"))
    before = await reload_mailbox(runtime, mailbox_id)
    microsoft.microsoft.expire_access_tokens(address)
    if fails:

        async def unavailable(*args: Any) -> list[service.Prepared]:
            raise TransientProviderError("down for maintenance")

        monkeypatch.setattr(jobs, "fetch_and_parse", unavailable)
    result = await run_pass(runtime, mailbox_id)
    assert result is not None
    after = await reload_mailbox(runtime, mailbox_id)
    rotated = read_credentials(runtime.settings.secret, after)
    assert (
        rotated["refresh_token"]
        != read_credentials(runtime.settings.secret, before)["refresh_token"]
    )
    if fails:
        assert result.error is not None and after.status == MailboxStatus.ERROR
        assert after.consecutive_failures == 1
    else:
        assert result.error is None and result.filed == 1
        assert after.status == MailboxStatus.ACTIVE and after.cursor != before.cursor


@pytest.mark.parametrize("reconnected", [False, True])
async def test_r15_a_send_stores_a_refreshed_token_only_over_the_credentials_it_used(
    gql: GQL,
    factory: Factory,
    google: SandboxServer,
    runtime: Runtime,
    monkeypatch: pytest.MonkeyPatch,
    reconnected: bool,
) -> None:
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    ann = f"{unique('ann')}@gmail.sandbox.test"
    google.google.ensure_account(ann)
    before = read_credentials(runtime.settings.secret, await reload_mailbox(runtime, mailbox_id))
    google.google.expire_access_tokens(address)
    new_credentials = {"access_token": "new", "refresh_token": "new"}
    real = sending_jobs.provider_for_mailbox

    def reconnect_during_the_send(settings: Settings, mailbox: Mailbox) -> MailProvider:
        provider = real(settings, mailbox)
        send = provider.send

        async def sent_then_reconnected(raw: bytes, thread_id: str | None = None) -> SentMessage:
            outcome = await send(raw, thread_id)
            async with runtime.unit_of_work() as work:
                await work.session.execute(
                    sa.update(Mailbox)
                    .where(col(Mailbox.id) == mailbox_id)
                    .values(
                        credentials_encrypted=encrypt_json(runtime.settings.secret, new_credentials)
                    )
                )
            return outcome

        if reconnected:
            monkeypatch.setattr(provider, "send", sent_then_reconnected)
        return provider

    monkeypatch.setattr(sending_jobs, "provider_for_mailbox", reconnect_during_the_send)
    body = await gql(
        """mutation($input: SendEmailInput!) { sendEmail(input: $input) {
             email { id } userErrors { code } } }""",
        {"input": {"mailboxId": to_global_id("Mailbox", mailbox_id), "to": [ann], "subject": "Hi"}},
        token=owner.token,
    )
    assert body["sendEmail"]["userErrors"] == []
    await drain(runtime)
    stored = read_credentials(runtime.settings.secret, await reload_mailbox(runtime, mailbox_id))
    if reconnected:
        assert stored == new_credentials
    else:
        assert stored["access_token"] != before["access_token"]  # the refreshed one is kept
        assert stored["refresh_token"] == before["refresh_token"]
