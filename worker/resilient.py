"""arq's worker, made to ride out a Redis restart.

arq's poll loop lets a connection error escape, and the worker process exits (and stays down
without a restart policy). Here a poll that cannot reach Redis is logged once per outage and
tried again after a short, growing wait; running jobs go on, and whatever they could not
write to Redis meanwhile is retried as arq retries a dead worker's job."""

from __future__ import annotations

import asyncio
import logging

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
