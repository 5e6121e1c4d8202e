"""A running job keeps its claim however its worker's poll loop fares (R14, R15), a send is looked
up only once the attempt before it has surely ended, and the worker's reads take no write lock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from arq import func
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from pydantic import ValidationError

from backend.auth.tables import Workspace
from backend.runtime import Runtime
from backend.settings import Settings
from backend.sync import jobs
from backend.sync.credentials import MailboxCredentialStore
from backend.sync.queue import sync_job_id
from tests.factories import Factory
from tests.sync_helpers import wait_until
from tests.worker import clear_queue
from worker.resilient import ResilientWorker

LEASE = 3
RENEWALS = 4  # renewals come every third of the lease: four span more than a whole lease


async def test_r14_r15_a_worker_renews_its_claims_while_its_poll_loop_is_held_up(
    runtime: Runtime,
) -> None:
    """Claims were renewed between polls only, so a poll held up for longer than a lease (a
    slow Redis answer, arq waiting inside `start_jobs`) let the running job's claim lapse, and
    another worker started the same pass or send again. They are renewed by a task of their
    own now."""
    await clear_queue(runtime)
    finish = asyncio.Event()
    resume_polling = asyncio.Event()
    polls_held = 0

    async def hold(ctx: dict[str, Any]) -> None:
        await finish.wait()

    assert await runtime.redis.enqueue_job("hold", _job_id="lease-held") is not None
    worker = ResilientWorker(
        functions=[func(hold, name="hold", keep_result=0)],
        redis_settings=RedisSettings.from_dsn(runtime.settings.redis_url),
        ctx={},
        poll_delay=0.05,
        handle_signals=False,
        lease_seconds=LEASE,
    )
    heart_beat = worker.heart_beat

    async def held_heart_beat() -> None:
        # The end of every poll: once the job runs, the poll loop stops here until released.
        nonlocal polls_held
        if worker.tasks and not resume_polling.is_set():
            polls_held += 1
            await resume_polling.wait()
        await heart_beat()

    worker.heart_beat = held_heart_beat  # type: ignore[method-assign]
    task = asyncio.create_task(worker.async_run())
    try:

        async def started() -> bool:
            return polls_held == 1

        await wait_until(started, 60)
        claim = in_progress_key_prefix + "lease-held"
        seen = {"renewals": 0, "ttl": await runtime.redis.pttl(claim)}

        async def renewed_for_longer_than_a_lease() -> bool:
            ttl = await runtime.redis.pttl(claim)
            assert ttl > 0, "the running job's claim lapsed"
            if ttl > seen["ttl"]:
                seen["renewals"] += 1
            seen["ttl"] = ttl
            return seen["renewals"] >= RENEWALS

        await wait_until(renewed_for_longer_than_a_lease, 20 * LEASE)
        assert polls_held == 1  # one poll, held all along
    finally:
        resume_polling.set()
        finish.set()

        async def finished() -> bool:
            return worker.jobs_complete == 1

        with contextlib.suppress(AssertionError):
            await wait_until(finished, 60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        await clear_queue(runtime)


def test_r15_a_send_is_looked_up_only_after_the_previous_attempt_surely_ended() -> None:
    """A retry looks for the mail SEND_CONFIRM_SECONDS after the previous attempt started;
    that attempt may go on until its timeout (its worker lost the claim), so a shorter wait
    would find nothing and send again."""
    fields = Settings.model_fields
    defaults = {
        name: fields[f"{name}_seconds"].default
        for name in ("send_confirm", "send_timeout", "job_lease")
    }
    assert defaults["send_confirm"] > defaults["send_timeout"] + defaults["job_lease"]

    def development(confirm: float, timeout: int, lease: int) -> Settings:
        return Settings(
            env="development",
            send_confirm_seconds=confirm,
            send_timeout_seconds=timeout,
            job_lease_seconds=lease,
        )

    with pytest.raises(ValidationError, match="MAILSYNC_SEND_CONFIRM_SECONDS"):
        development(60, 120, 30)
    with pytest.raises(ValidationError, match="MAILSYNC_SEND_CONFIRM_SECONDS"):
        development(150, 120, 30)
    assert development(60, 20, 30).send_confirm_seconds == 60


@asynccontextmanager
async def a_writer_holding_the_lock(runtime: Runtime, factory: Factory) -> AsyncIterator[None]:
    """An open write transaction: on SQLite it holds the write lock until it ends. A read
    that began IMMEDIATE, like a write, waited for it (up to the 30 s busy timeout, then
    failed)."""
    owner = await factory.workspace()
    async with runtime.unit_of_work() as writing:
        row = await writing.session.get(Workspace, owner.workspace.id)
        assert row is not None
        row.name = "Not yet committed"
        writing.session.add(row)
        await writing.session.flush()  # SQLite's write lock is held from here to the commit
        yield


async def test_the_scheduler_never_waits_for_a_writer(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner, "scheduled@crm.test")
    await clear_queue(runtime)
    try:
        async with a_writer_holding_the_lock(runtime, factory):
            assert await jobs.schedule_due(runtime) >= 1
            queued = await runtime.redis.zrange("arq:queue", 0, -1)
            assert sync_job_id(str(mailbox.id)).encode() in queued
    finally:
        # Every other test's mailbox is due too: running their passes here only costs time.
        await clear_queue(runtime)


async def test_the_outbox_relay_never_waits_for_a_writer(
    factory: Factory, runtime: Runtime
) -> None:
    async with a_writer_holding_the_lock(runtime, factory):
        # Nothing a day old is left in the outbox: the relay only looks.
        assert await runtime.relay_outbox(older_than=24 * 3600) == 0


async def test_loading_credentials_never_waits_for_a_writer(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner, "credentials@crm.test")
    store = MailboxCredentialStore(runtime.unit_of_work, runtime.settings.secret, mailbox.id)
    async with a_writer_holding_the_lock(runtime, factory):
        assert await store.load() == {"token": "secret-token"}
