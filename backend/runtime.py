"""The long-lived clients of one process (API, worker or CLI), created once at start-up, and
the one way every request, route and job ends its transaction: `Runtime.unit_of_work`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database
from backend.db import read_only as mark_read_only
from backend.events import outbox
from backend.events.bus import EventBus, EventHub
from backend.kit.effects import AfterCommit, Effect, JobSink
from backend.settings import Settings

log = logging.getLogger(__name__)

# How long the release right after a commit may take before it is left to the relay: a
# Redis that hangs must not hold a committed mutation's answer.
RELEASE_TIMEOUT_SECONDS = 5.0
RELAY_BATCH = 500
RELAY_MAX_BATCHES = 20


@dataclass
class Work:
    """One transaction and the jobs and events it will release if it commits."""

    session: AsyncSession
    effects: AfterCommit = field(default_factory=AfterCommit)
    discarded: bool = False

    def discard(self) -> None:
        """End in a rollback: nothing written stays, nothing buffered is released."""
        self.discarded = True


class Runtime:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        redis: ArqRedis,
        hub: EventHub | None,
        jobs: Callable[[ArqRedis], JobSink],
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.bus = EventBus(redis)
        self.hub = hub
        self.jobs = jobs(redis)

    @classmethod
    async def create(
        cls, settings: Settings, *, jobs: Callable[[ArqRedis], JobSink], with_hub: bool = False
    ) -> Runtime:
        db = Database(settings.database_url)
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        hub = EventHub(settings.redis_url) if with_hub else None
        if hub is not None:
            await hub.start()
        return cls(settings, db, redis, hub, jobs)

    async def close(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
        await self.redis.aclose()
        await self.db.dispose()

    async def publish(
        self, workspace_id: str, event: dict[str, Any], event_id: str | None = None
    ) -> None:
        await self.bus.publish(workspace_id, event, event_id)

    @asynccontextmanager
    async def unit_of_work(self, *, read_only: bool = False) -> AsyncIterator[Work]:
        """Commit, then release the buffered jobs and events; on an exception or `discard()`,
        roll back and drop them. Services inside only flush. `read_only`: the work only reads,
        so on SQLite it takes no write lock (`db.read_only`).

        The jobs and events are written to the outbox in the transaction itself, so once the
        commit succeeded nothing here fails: a release that cannot reach Redis is logged and
        left to the relay."""
        async with self.db.sessionmaker() as session:
            if read_only:
                mark_read_only(session)
            work = Work(session)
            try:
                yield work
            except BaseException:
                work.effects.clear()
                await session.rollback()
                raise
            if work.discarded:
                work.effects.clear()
                await session.rollback()
                return
            pending = work.effects.take()
            session.add_all(outbox.entries_for([e for e in pending if e.durable]))
            await session.commit()
        await self.release(pending)

    async def release(self, effects: Sequence[Effect]) -> int:
        """Release committed effects in order, stopping at the first Redis failure, and delete
        the outbox rows of those released. Never raises but on cancellation: what is not
        released (or released but not deleted) stays in the outbox for the relay, which may
        repeat it (jobs are keyed by their arq id, events by their id)."""
        released: list[str] = []
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                for effect in effects:
                    await effect.release(self.bus, self.jobs)
                    if effect.durable:
                        released.append(effect.id)
        except Exception as exc:
            log.warning(
                "released %d of %d committed jobs and events (%r); the outbox relay has the rest",
                len(released),
                len(effects),
                exc,
            )
        if released:
            try:
                async with self.db.sessionmaker() as session:
                    await outbox.forget(session, released)
                    await session.commit()
            except Exception:
                log.exception("could not clear %d released outbox rows", len(released))
        return len(released)

    async def relay_outbox(self, older_than: float) -> int:
        """Release what the outbox still holds from commits at least `older_than` seconds
        ago; return how many were released. At least once: a row is deleted only after Redis
        took it."""
        relayed = 0
        for _ in range(RELAY_MAX_BATCHES):
            async with self.db.sessionmaker() as session:
                mark_read_only(session)
                effects = await outbox.due(session, older_than, RELAY_BATCH)
                await session.rollback()
            done = await self.release(effects) if effects else 0
            relayed += done
            if done < RELAY_BATCH:
                break
        return relayed
