"""Run the real arq worker functions in-process, against the real Redis queue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker

from backend.runtime import Runtime
from worker.resilient import ResilientWorker
from worker.settings import WorkerSettings


def burst_worker(runtime: Runtime) -> Worker:
    return Worker(
        functions=WorkerSettings.functions,
        redis_settings=RedisSettings.from_dsn(runtime.settings.redis_url),
        burst=True,
        ctx={"runtime": runtime},
        after_job_end=WorkerSettings.after_job_end,
        poll_delay=0.05,
        handle_signals=False,
    )


async def drain(runtime: Runtime) -> int:
    """Run every queued job, including the ones jobs enqueue; return how many ran."""
    ran = 0
    while True:
        worker = burst_worker(runtime)
        try:
            await worker.main()
        finally:
            await worker.close()
        ran += worker.jobs_complete + worker.jobs_failed
        if not await runtime.redis.zcard("arq:queue"):
            return ran


async def clear_queue(runtime: Runtime) -> None:
    """Forget jobs other tests left queued, so each test counts only its own."""
    keys = [key async for key in runtime.redis.scan_iter("arq:*")]
    if keys:
        await runtime.redis.delete(*keys)


@asynccontextmanager
async def live_worker(
    runtime: Runtime, lease_seconds: float = WorkerSettings.lease_seconds
) -> AsyncIterator[Worker]:
    """A worker that keeps polling, as `mailsync worker` does, inside the test's event loop."""
    worker = ResilientWorker(
        functions=WorkerSettings.functions,
        redis_settings=RedisSettings.from_dsn(runtime.settings.redis_url),
        ctx={"runtime": runtime},
        after_job_end=WorkerSettings.after_job_end,
        poll_delay=0.05,
        handle_signals=False,
        lease_seconds=lease_seconds,
    )
    task = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # A job still finishing (its after_job_end, a cron run) is cancelled with the worker,
        # and close() gathers it: that cancellation is the one we asked for.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()


async def idle(runtime: Runtime, worker: Worker) -> bool:
    """Nothing queued, nothing claimed, and none of the worker's job tasks still running
    (a job's after_job_end, which may queue one more pass, runs inside its task)."""
    if await runtime.redis.zcard("arq:queue"):
        return False
    if [key async for key in runtime.redis.scan_iter(in_progress_key_prefix + "*")]:
        return False
    return all(task.done() for task in worker.tasks.values())


@contextmanager
def worker_process(
    job_timeout: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`mailsync worker` as its own process, to be killed. A dead worker's job is retried
    once its claim lapses: within the job lease (MAILSYNC_JOB_LEASE_SECONDS), or the longest
    job timeout (passes and sends) + 10 seconds when that is shorter. `env` overrides the
    test's settings (another Redis, another database)."""
    env = dict(
        os.environ,
        **(env or {}),
        MAILSYNC_SYNC_PASS_TIMEOUT_SECONDS=str(job_timeout),
        MAILSYNC_SEND_TIMEOUT_SECONDS=str(job_timeout),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
