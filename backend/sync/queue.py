"""The sync job's identity in arq, and R14's "one pass at a time, one more if asked meanwhile".

`SyncQueue` is the job sink every unit of work releases its sync requests to."""

from __future__ import annotations

from arq import ArqRedis
from arq.constants import in_progress_key_prefix

SYNC_FUNCTION = "sync_mailbox"
SYNC_PREFIX = "sync:"


def sync_job_id(mailbox_id: str) -> str:
    return f"{SYNC_PREFIX}{mailbox_id}"


def sync_again_key(mailbox_id: str) -> str:
    return f"mailsync:sync-again:{mailbox_id}"


class SyncQueue:
    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis

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

    async def after_pass(self, mailbox_id: str) -> None:
        """A sync requested while this pass ran earns exactly one more pass (R14)."""
        if await self.redis.getdel(sync_again_key(mailbox_id)):
            await self.enqueue_sync(mailbox_id)
