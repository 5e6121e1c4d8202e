"""arq worker: `mailsync worker` (or `arq worker.settings.WorkerSettings`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings

from backend.runtime import Runtime
from backend.sending import jobs as sending_jobs
from backend.sending.jobs import MAX_SEND_ATTEMPTS
from backend.sending.queue import SEND_FUNCTION, JobQueue
from backend.settings import configure_logging, get_settings
from backend.sync import jobs
from backend.sync.idle import IdleSupervisor
from backend.sync.parsing import shutdown_pool
from backend.sync.queue import SYNC_FUNCTION, SYNC_PREFIX
from worker.relay import relay_forever


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    configure_logging(settings)
    ctx["runtime"] = runtime = await Runtime.create(settings, jobs=JobQueue)
    ctx["relay"] = asyncio.create_task(
        relay_forever(runtime, settings.outbox_relay_seconds), name="outbox-relay"
    )
    if settings.imap_idle:
        # IMAP push (R14): the IDLE connections live in this process, beside the jobs.
        ctx["idle"] = asyncio.create_task(IdleSupervisor(runtime).run(), name="imap-idle")


async def shutdown(ctx: dict[str, Any]) -> None:
    for name in ("idle", "relay"):
        task: asyncio.Task[None] | None = ctx.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # arq has waited for its job tasks before this hook, so no parse is in flight.
    await asyncio.to_thread(shutdown_pool)
    await ctx["runtime"].close()


async def sync_mailbox(ctx: dict[str, Any], mailbox_id: str) -> dict[str, int] | None:
    result = await jobs.sync_mailbox(ctx["runtime"], mailbox_id)
    return None if result is None else {"filed": result.filed, "failed": result.failed}


async def send_email(ctx: dict[str, Any], email_id: str) -> str:
    return await sending_jobs.send_email(ctx["runtime"], email_id)


async def schedule_due(ctx: dict[str, Any]) -> int:
    return await jobs.schedule_due(ctx["runtime"])


async def requeue_unsent(ctx: dict[str, Any]) -> int:
    return await sending_jobs.requeue_unsent(ctx["runtime"])


async def after_job_end(ctx: dict[str, Any]) -> None:
    job_id = str(ctx.get("job_id", ""))
    if job_id.startswith(SYNC_PREFIX):
        await jobs.after_sync(ctx["runtime"], job_id.removeprefix(SYNC_PREFIX))


# A running job's in-progress key is its claim: it lasts JOB_LEASE_SECONDS and the worker
# renews it (worker/resilient.py); when a worker is killed mid-job the key lapses and another
# worker retries the job within the lease (R14, R15), not the job's timeout.
# A pass stops itself after SYNC_PASS_TIMEOUT_SECONDS and records the failure
# (sync/jobs.run_pass); arq's own limit, PASS_GRACE later, only stops a pass stuck past that.
PASS_GRACE = 5
PASS_TIMEOUT = get_settings().sync_pass_timeout_seconds + PASS_GRACE
SEND_TIMEOUT = get_settings().send_timeout_seconds
LEASE_SECONDS = get_settings().job_lease_seconds


class WorkerSettings:
    functions = [
        func(sync_mailbox, name=SYNC_FUNCTION, keep_result=0, timeout=PASS_TIMEOUT, max_tries=5),
        # The job counts its own attempts (R15) and waits between them with arq's Retry;
        # arq's count only bounds a crash loop.
        func(
            send_email,
            name=SEND_FUNCTION,
            keep_result=0,
            timeout=SEND_TIMEOUT,
            max_tries=4 * MAX_SEND_ATTEMPTS,
        ),
    ]
    job_timeout = PASS_TIMEOUT
    cron_jobs = [
        cron(schedule_due, second={0}, run_at_startup=True, unique=True, keep_result=0),
        cron(requeue_unsent, second={30}, unique=True, keep_result=0),
    ]
    on_startup = startup
    on_shutdown = shutdown
    after_job_end = after_job_end
    redis_settings = RedisSettings.from_dsn(get_settings().redis_url)
    max_jobs = 20
    # Pushes enqueue a pass; polling the queue often keeps mail on the timeline within seconds.
    poll_delay = 0.1
    health_check_interval = 30
    # Not an arq setting: ResilientWorker's (the CLI and the tests pass it).
    lease_seconds = LEASE_SECONDS
