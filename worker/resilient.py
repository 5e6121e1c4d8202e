"""arq's worker, made to ride out a Redis restart.

arq's poll loop lets a connection error escape, and the worker process exits (and stays down
without a restart policy). Here a poll that cannot reach Redis is logged once per outage and
tried again after a short, growing wait; running jobs go on, and whatever they could not
write to Redis meanwhile is retried as arq retries a dead worker's job.

It also makes a dead worker's jobs come back sooner: arq claims a job (its in-progress key)
for the longest job timeout + 10 s, so a pass killed mid-way waited minutes for another
worker. With `lease_seconds` the claim lasts that long and the worker renews the claims of
its running jobs every third of it; once the worker is gone they lapse, and another worker
takes the job within the lease, while a live worker's job is never taken from it. The claims
are renewed by a task of their own, not between polls: a poll held up for longer than a lease
(a slow Redis answer, a wait inside arq's `start_jobs`) would let them lapse meanwhile, and
another worker would run the same pass or send again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
# Waits between polls while Redis is unreachable: 0.25 s doubling up to this.
MAX_WAIT_SECONDS = 5.0


class ResilientWorker(Worker):
    # Outages seen (each counted once, when it starts).
    outages = 0
    _failing = 0

    def __init__(self, *args: Any, lease_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leasing = lease_seconds is not None
        if lease_seconds is not None:
            self.in_progress_timeout_s = min(self.in_progress_timeout_s, lease_seconds)
        self._renewer: asyncio.Task[None] | None = None

    async def main(self) -> None:
        if self.leasing and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="lease-renewal")
        await super().main()

    async def close(self) -> None:
        # Renewing goes on until close() has waited for the running jobs: they still run
        # once the poll loop has stopped.
        try:
            await super().close()
        finally:
            renewer, self._renewer = self._renewer, None
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.in_progress_timeout_s / 3)
            if self._pool is None:
                continue  # not connected yet, or closing
            try:
                await self._renew_claims()
            except UNREACHABLE as exc:
                # The poll loop reports the outage; renewing resumes when Redis is back.
                log.debug("could not renew job claims: %r", exc)
            except Exception:
                log.exception("could not renew job claims")

    async def _renew_claims(self) -> None:
        running = [job_id for job_id, task in self.tasks.items() if not task.done()]
        if not running:
            return
        lease_ms = int(self.in_progress_timeout_s * 1000)
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in running:
                # A claim arq already deleted (the job just finished) stays deleted.
                pipe.pexpire(in_progress_key_prefix + job_id, lease_ms)
            await pipe.execute()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except UNREACHABLE as exc:
            if not self._failing:
                self.outages += 1
                log.warning("Redis is unreachable (%r); retrying until it is back", exc)
            self._failing += 1
            await asyncio.sleep(min(MAX_WAIT_SECONDS, 0.25 * 2 ** min(self._failing - 1, 10)))
            return
        if self._failing:
            log.warning("Redis is reachable again after %d failed polls", self._failing)
            self._failing = 0
