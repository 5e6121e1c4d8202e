"""The outbox relay: jobs and events committed but not released to Redis right after their
commit (Redis was down, the process died in between) are released from here, at least once.

It runs as a task beside arq's poll loop in every worker, not as an arq job: a job needs
Redis to be enqueued, and the relay matters most when Redis has just come back."""

from __future__ import annotations

import asyncio
import logging

from backend.runtime import Runtime

log = logging.getLogger(__name__)


async def relay_forever(runtime: Runtime, every: float) -> None:
    """Relay outbox rows at least `every` seconds old, every `every` seconds. Several workers
    may relay the same row: its job is keyed by the arq job id and its event by its id."""
    while True:
        try:
            relayed = await runtime.relay_outbox(older_than=every)
            if relayed:
                log.info("relayed %d jobs and events from the outbox", relayed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("outbox relay failed; trying again in %.1fs", every)
        await asyncio.sleep(every)
