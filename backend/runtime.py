"""The long-lived clients of one process (API, worker or CLI), created once at start-up, and
the one way every request, route and job ends its transaction: `Runtime.unit_of_work`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import Database
from backend.db import read_only as mark_read_only
from backend.events.bus import EventBus, EventHub
from backend.kit.effects import AfterCommit, JobSink
from backend.settings import Settings

log = logging.getLogger(__name__)


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

    async def publish(self, workspace_id: str, event: dict[str, Any]) -> None:
        await self.bus.publish(workspace_id, event)

    @asynccontextmanager
    async def unit_of_work(self, *, read_only: bool = False) -> AsyncIterator[Work]:
        """Commit, then release the buffered jobs and events; on an exception or `discard()`,
        roll back and drop them. Services inside only flush. `read_only`: the work only reads,
        so on SQLite it takes no write lock (`db.read_only`)."""
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
            await session.commit()
        await work.effects.release(self.bus, self.jobs)
