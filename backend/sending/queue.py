"""The send job's identity in arq, and the job sink of every process (sync passes and
sends): the entry points hand `JobQueue` to `Runtime.create`."""

from __future__ import annotations

from backend.sync.queue import SyncQueue

SEND_FUNCTION = "send_email"
SEND_PREFIX = "send:"


def send_job_id(email_id: str) -> str:
    return f"{SEND_PREFIX}{email_id}"


class JobQueue(SyncQueue):
    async def enqueue_send(self, email_id: str, defer_seconds: float = 0) -> None:
        """One job per email: a second request while it is queued or running is the same job."""
        await self.redis.enqueue_job(
            SEND_FUNCTION,
            email_id,
            _job_id=send_job_id(email_id),
            _defer_by=defer_seconds or None,
        )
