"""Side effects buffered during a unit of work and released only after it commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class EventSink(Protocol):
    async def publish(self, workspace_id: str, event: dict[str, Any]) -> None: ...


class JobSink(Protocol):
    async def enqueue_sync(self, mailbox_id: str, defer_seconds: float = 0) -> None: ...


@dataclass
class AfterCommit:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sync_requests: list[str] = field(default_factory=list)

    def publish(self, workspace_id: object, event: dict[str, Any]) -> None:
        self.events.append((str(workspace_id), event))

    def request_sync(self, mailbox_id: object) -> None:
        if str(mailbox_id) not in self.sync_requests:
            self.sync_requests.append(str(mailbox_id))

    def clear(self) -> None:
        self.events.clear()
        self.sync_requests.clear()

    async def release(self, events: EventSink, jobs: JobSink) -> None:
        pending_events, pending_jobs = list(self.events), list(self.sync_requests)
        self.clear()
        for mailbox_id in pending_jobs:
            await jobs.enqueue_sync(mailbox_id)
        for workspace_id, event in pending_events:
            await events.publish(workspace_id, event)
