"""The shape of a pass: no transaction held across provider calls, an idle pass that costs at
most two provider calls and three statements, and progress saved batch by batch so that an
interrupted first sync resumes where it stopped."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlmodel import select

from backend.auth.tables import Workspace
from backend.graphql.relay import to_global_id
from backend.mail.tables import Email
from backend.mailboxes.tables import MailboxStatus
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from backend.sync.jobs import run_pass
from backend.sync.service import FETCH_BATCH
from backend.sync.tables import SyncBacklog
from tests.client import GQL
from tests.factories import Factory, raw_message
from tests.sandbox import SandboxServer
from tests.sync_helpers import reload_mailbox, wait_until
from tests.test_gmail import MAILBOX
from tests.test_gmail import connected as connected_gmail
from tests.test_microsoft import connected as connected_outlook
from tests.worker import clear_queue, idle, live_worker

# BEGIN is transaction control, not a statement of the pass (PostgreSQL's drivers send it
# outside the cursor; SQLite's is ours, DEFERRED for the read and IMMEDIATE for the write).
IDLE_PASS_STATEMENTS = 3
IDLE_PASS_PROVIDER_CALLS = 2


@contextmanager
def statements_of(runtime: Runtime) -> Iterator[list[str]]:
    seen: list[str] = []
    engine = runtime.db.engine.sync_engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not statement.lstrip().upper().startswith("BEGIN"):
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def subjects_filed(runtime: Runtime, workspace_id: uuid.UUID) -> list[str]:
    async with runtime.db.sessionmaker() as session:
        return list(
            await session.scalars(select(Email.subject).where(Email.workspace_id == workspace_id))
        )


async def test_an_api_query_answers_while_a_pass_is_blocked_inside_a_provider_call(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    """On SQLite a pass held BEGIN IMMEDIATE across its provider calls, so every request (reads
    included) waited for it, up to the 30 s busy timeout, then failed."""
    owner, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
    microsoft.microsoft.deliver(address, raw_message("kai@client.test", [address], "Later"))
    # Longer than SQLite's busy timeout: a request waiting for the pass would fail.
    hang = microsoft.microsoft.faults.add(
        Fault(delay_seconds=120, account=address, path="/delta", times=1)
    )
    running = asyncio.create_task(run_pass(runtime, mailbox_id))
    try:

        async def blocked() -> bool:
            return hang.hits == 1

        await wait_until(blocked, 60)
        shown = await gql(MAILBOX, {"id": to_global_id("Mailbox", mailbox_id)}, token=owner.token)
        assert shown["mailbox"]["emailAddress"] == address
        assert not running.done()  # answered while the pass was still inside Graph's call
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_graphql_query_never_waits_for_a_writer(
    gql: GQL, factory: Factory, api: Any, runtime: Runtime
) -> None:
    """Reads began IMMEDIATE on SQLite like writes, so a query waited for any open write
    transaction (up to the 30 s busy timeout, then failed). A query, its authentication and a
    read-only unit of work now take no write lock; what they read is the last commit."""
    owner = await factory.workspace()
    async with runtime.unit_of_work() as writing:
        row = await writing.session.get(Workspace, owner.workspace.id)
        assert row is not None
        named = row.name
        row.name = "Not yet committed"
        writing.session.add(row)
        await writing.session.flush()  # SQLite's write lock is held from here to the commit
        shown = await gql("{ viewer { workspace { name } } }", token=owner.token)
        assert shown["viewer"]["workspace"]["name"] == named
        async with runtime.unit_of_work(read_only=True) as reading:
            seen = await reading.session.get(Workspace, owner.workspace.id)
            assert seen is not None and seen.name == named


async def test_an_idle_gmail_pass_makes_at_most_two_provider_calls_and_three_statements(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    calls = google.google.faults.add(Fault(account=address))  # no error, no delay: a counter
    with statements_of(runtime) as statements:
        result = await run_pass(runtime, mailbox_id)
    assert result is not None and result.error is None and result.filed == 0
    assert calls.hits <= IDLE_PASS_PROVIDER_CALLS, calls.hits
    assert len(statements) <= IDLE_PASS_STATEMENTS, statements
    row = await reload_mailbox(runtime, mailbox_id)
    assert row.last_synced_at is not None and row.last_synced_at >= result.started_at


async def test_an_idle_outlook_pass_makes_at_most_two_provider_calls_and_three_statements(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    _, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
    calls = microsoft.microsoft.faults.add(Fault(account=address))
    with statements_of(runtime) as statements:
        result = await run_pass(runtime, mailbox_id)
    assert result is not None and result.error is None and result.filed == 0
    assert calls.hits <= IDLE_PASS_PROVIDER_CALLS, calls.hits
    assert len(statements) <= IDLE_PASS_STATEMENTS, statements


async def test_r7_an_interrupted_first_sync_resumes_without_fetching_what_it_filed(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    """A pass that dies after some batches kept nothing: the next one listed and fetched the
    whole change set again (forever, when the pass always died at the same point)."""
    owner, mailbox_id, address = await connected_gmail(gql, factory, google, runtime)
    await factory.contact(owner, "kim@client.test", "Kim")
    total = 2 * FETCH_BATCH + 10
    delivered = [
        google.google.deliver(address, raw_message("kim@client.test", [address], f"M{i}"))
        for i in range(total)
    ]
    # The third batch's fetch hangs until the pass is killed (its worker dies).
    hang = google.google.faults.add(
        Fault(
            delay_seconds=600,
            account=address,
            method="GET",
            path=f"/messages/{delivered[2 * FETCH_BATCH].id}$",
            times=1,
        )
    )
    running = asyncio.create_task(run_pass(runtime, mailbox_id))

    async def two_batches_filed() -> bool:
        filed = await subjects_filed(runtime, owner.workspace.id)
        return hang.hits == 1 and len(filed) == 2 * FETCH_BATCH

    try:
        await wait_until(two_batches_filed, 120)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    async with runtime.db.sessionmaker() as session:
        left = await session.scalar(
            select(sa.func.count()).where(SyncBacklog.mailbox_id == mailbox_id)
        )
    assert left == total - 2 * FETCH_BATCH

    fetches = google.google.faults.add(Fault(account=address, method="GET", path="/messages/"))
    result = await run_pass(runtime, mailbox_id)
    assert result is not None and result.error is None
    assert result.filed == total - 2 * FETCH_BATCH
    assert fetches.hits == total - 2 * FETCH_BATCH  # only the batches not yet filed
    subjects = await subjects_filed(runtime, owner.workspace.id)
    assert sorted(subjects) == sorted(f"M{i}" for i in range(total))  # each once
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE
    again = await run_pass(runtime, mailbox_id)
    assert again is not None and again.filed == 0 and again.duplicates == 0


async def test_r14_a_pass_longer_than_the_job_lease_is_never_taken_over_by_another_worker(
    gql: GQL, factory: Factory, microsoft: SandboxServer, runtime: Runtime
) -> None:
    """A live worker renews its pass's claim, so a second worker never starts the same pass
    however long it runs (only a dead worker's claim lapses)."""
    owner, mailbox_id, address = await connected_outlook(gql, factory, microsoft, runtime)
    await factory.contact(owner, "kai@client.test", "Kai")
    microsoft.microsoft.deliver(address, raw_message("kai@client.test", [address], "Slow"))
    await microsoft.microsoft.drain_notifications()
    await clear_queue(runtime)  # only the pass enqueued below runs
    lease = 6
    # The pass waits in Graph for several leases; every other delta call is only counted.
    hang = microsoft.microsoft.faults.add(
        Fault(delay_seconds=4 * lease, account=address, path="/delta", times=1)
    )
    deltas = microsoft.microsoft.faults.add(Fault(account=address, path="/delta"))
    async with live_worker(runtime, lease) as first, live_worker(runtime, lease) as second:
        await runtime.jobs.enqueue_sync(str(mailbox_id))

        async def done() -> bool:
            filed = await subjects_filed(runtime, owner.workspace.id)
            return bool(filed) and await idle(runtime, first) and await idle(runtime, second)

        await wait_until(done, 4 * lease + 120)
    assert hang.hits == 1
    assert deltas.hits == 1  # the pass's other folder: one pass, not two
    assert await subjects_filed(runtime, owner.workspace.id) == ["Slow"]
