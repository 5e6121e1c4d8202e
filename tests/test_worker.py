"""Sync jobs: one pass per mailbox queued or running; a request during a pass earns one more."""

from __future__ import annotations

import asyncio

from arq.constants import in_progress_key_prefix

from backend.runtime import Runtime
from backend.sync import jobs
from backend.sync.queue import sync_job_id
from tests.factories import Factory
from tests.providers import fake_provider
from tests.worker import clear_queue, drain


async def _keep_only(runtime: Runtime, job_ids: set[bytes]) -> None:
    """Drop every queued job but these (arq keeps the queue in a sorted set, each job's
    payload under arq:job:<id>)."""
    others = [j for j in await _queued(runtime) if j not in job_ids]
    if others:
        await runtime.redis.zrem("arq:queue", *others)
        await runtime.redis.delete(*(b"arq:job:" + j for j in others))


async def _queued(runtime: Runtime) -> list[bytes]:
    return list(await runtime.redis.zrange("arq:queue", 0, -1))


async def test_requests_while_queued_collapse_into_one_job(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    for _ in range(3):
        await runtime.jobs.enqueue_sync(str(mailbox.id))
    assert (await _queued(runtime)).count(sync_job_id(str(mailbox.id)).encode()) == 1
    with fake_provider():
        assert await drain(runtime) == 1


async def test_request_during_a_running_pass_runs_exactly_one_more(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    mailbox_id = str(mailbox.id)
    with fake_provider():
        await runtime.jobs.enqueue_sync(mailbox_id)
        # Pretend a worker picked it up: the job is in progress.
        await runtime.redis.set(in_progress_key_prefix + sync_job_id(mailbox_id), b"1", px=60_000)
        await runtime.jobs.enqueue_sync(mailbox_id)
        await runtime.jobs.enqueue_sync(mailbox_id)
        await runtime.redis.delete(in_progress_key_prefix + sync_job_id(mailbox_id))
        assert await drain(runtime) == 2  # the queued pass, then exactly one more


async def test_scheduler_enqueues_only_due_mailboxes(factory: Factory, runtime: Runtime) -> None:
    from datetime import timedelta

    from backend.kit import clock
    from backend.mailboxes.tables import Mailbox, MailboxStatus

    owner = await factory.workspace()
    synced = await factory.mailbox(owner, "synced@crm.test")
    never = await factory.mailbox(owner, "never@crm.test")
    backing_off = await factory.mailbox(owner, "failing@crm.test")
    with fake_provider():
        await runtime.jobs.enqueue_sync(str(synced.id))
        await drain(runtime)
    async with runtime.db.transaction() as session:
        row = await session.get(Mailbox, backing_off.id)
        assert row is not None
        row.status = MailboxStatus.ERROR
        row.next_attempt_at = clock.now() + timedelta(minutes=10)
    await jobs.schedule_due(runtime)
    queued = await _queued(runtime)
    assert sync_job_id(str(never.id)).encode() in queued
    assert sync_job_id(str(synced.id)).encode() not in queued
    assert sync_job_id(str(backing_off.id)).encode() not in queued
    clock.advance(timedelta(minutes=11))  # past the backoff and the 5-minute cadence
    await jobs.schedule_due(runtime)
    queued = await _queued(runtime)
    assert sync_job_id(str(synced.id)).encode() in queued
    assert sync_job_id(str(backing_off.id)).encode() in queued
    # Every other test's mailbox is due too by now: running their passes here only costs time.
    await clear_queue(runtime)


async def test_scheduler_releases_disconnected_mailboxes_that_still_hold_credentials(
    factory: Factory, runtime: Runtime
) -> None:
    from backend.mailboxes.tables import Mailbox, MailboxStatus

    owner = await factory.workspace()
    # A disconnect whose job was lost (Redis flushed, say): credentials still stored.
    lost = await factory.mailbox(owner, "lost@crm.test")
    released = await factory.mailbox(owner, "released@crm.test")
    async with runtime.db.transaction() as session:
        for mailbox_id, keeps_credentials in ((lost.id, True), (released.id, False)):
            row = await session.get(Mailbox, mailbox_id)
            assert row is not None and row.credentials_encrypted is not None
            row.status = MailboxStatus.DISCONNECTED
            if not keeps_credentials:
                row.credentials_encrypted = None
    mine = {sync_job_id(str(lost.id)).encode(), sync_job_id(str(released.id)).encode()}
    await jobs.schedule_due(runtime)
    # Other tests' mailboxes may be due as well; only this workspace's are looked at and run.
    assert mine & set(await _queued(runtime)) == {sync_job_id(str(lost.id)).encode()}
    await _keep_only(runtime, mine)
    with fake_provider():
        await drain(runtime)
    async with runtime.db.sessionmaker() as session:
        row = await session.get(Mailbox, lost.id)
        assert row is not None and row.credentials_encrypted is None
    await jobs.schedule_due(runtime)
    assert mine & set(await _queued(runtime)) == set()
    await clear_queue(runtime)


async def test_concurrent_jobs_for_one_mailbox_never_overlap(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    results = await asyncio.gather(*(runtime.jobs.enqueue_sync(str(mailbox.id)) for _ in range(10)))
    assert results == [None] * 10
    assert (await _queued(runtime)).count(sync_job_id(str(mailbox.id)).encode()) == 1
    with fake_provider():
        assert await drain(runtime) == 1


async def test_scheduled_passes_are_spread_over_the_minute(
    factory: Factory, runtime: Runtime
) -> None:
    import time

    owner = await factory.workspace()
    mailboxes = [await factory.mailbox(owner, f"spread{i}@crm.test") for i in range(8)]
    runtime.settings.sync_spread_seconds = 60
    try:
        await jobs.schedule_due(runtime)
    finally:
        runtime.settings.sync_spread_seconds = 0
    scores = {
        member.decode(): score / 1000 - time.time()
        for member, score in await runtime.redis.zrange("arq:queue", 0, -1, withscores=True)
    }
    offsets = [scores[sync_job_id(str(m.id))] for m in mailboxes]
    assert all(-5 < o < 61 for o in offsets)
    assert len({round(o) for o in offsets}) > 1  # not all at the same moment
    await clear_queue(runtime)
