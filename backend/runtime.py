"""The long-lived clients of one process (API, worker or CLI), created once at start-up."""

from __future__ import annotations

import logging
from typing import Any

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix

from backend.db import Database
from backend.events.bus import EventBus, EventHub
from backend.settings import Settings

log = logging.getLogger(__name__)

SYNC_FUNCTION = "sync_mailbox"


def sync_job_id(mailbox_id: str) -> str:
    return f"sync:{mailbox_id}"


def sync_again_key(mailbox_id: str) -> str:
    return f"mailsync:sync-again:{mailbox_id}"


class Runtime:
    def __init__(
        self, settings: Settings, db: Database, redis: ArqRedis, hub: EventHub | None
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.bus = EventBus(redis)
        self.hub = hub

    @classmethod
    async def create(cls, settings: Settings, *, with_hub: bool = False) -> Runtime:
        db = Database(settings.database_url)
        redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        hub = EventHub(settings.redis_url) if with_hub else None
        if hub is not None:
            await hub.start()
        return cls(settings, db, redis, hub)

    async def close(self) -> None:
        if self.hub is not None:
            await self.hub.stop()
        await self.redis.aclose()
        await self.db.dispose()

    async def publish(self, workspace_id: str, event: dict[str, Any]) -> None:
        await self.bus.publish(workspace_id, event)

    async def enqueue_sync(self, mailbox_id: str, defer_seconds: float = 0) -> None:
        """Queue one pass (R14). A request during a running pass earns exactly one more after it."""
        job = await self.redis.enqueue_job(
            SYNC_FUNCTION,
            mailbox_id,
            _job_id=sync_job_id(mailbox_id),
            _defer_by=defer_seconds or None,
        )
        if job is not None:
            return
        if await self.redis.exists(in_progress_key_prefix + sync_job_id(mailbox_id)):
            await self.redis.set(sync_again_key(mailbox_id), "1", ex=24 * 3600)
        # Otherwise a pass is already queued and has not started: it will see this change too.
