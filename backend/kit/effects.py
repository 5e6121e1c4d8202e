"""Side effects buffered during a unit of work and released only after it commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class EventSink(Protocol):
    async def publish(self, workspace_id: str, event: dict[str, Any]) -> None: ...


class JobSink(Protocol):
    async def enqueue_sync(self, mailbox_id: str, defer_seconds: float = 0) -> None: ...

    async def enqueue_send(self, email_id: str) -> None: ...


@dataclass
class AfterCommit:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sync_requests: list[str] = field(default_factory=list)
    send_requests: list[str] = field(default_factory=list)

    def publish(self, workspace_id: object, event: dict[str, Any]) -> None:
        self.events.append((str(workspace_id), event))

    def request_sync(self, mailbox_id: object) -> None:
        if str(mailbox_id) not in self.sync_requests:
            self.sync_requests.append(str(mailbox_id))

    def request_send(self, email_id: object) -> None:
        if str(email_id) not in self.send_requests:
            self.send_requests.append(str(email_id))

    def marks(self) -> tuple[int, int, int]:
        return len(self.events), len(self.sync_requests), len(self.send_requests)

    def drop_after(self, marks: tuple[int, int, int]) -> None:
        """Forget what was buffered since `marks()` (a savepoint rolled back)."""
        del self.events[marks[0] :]
        del self.sync_requests[marks[1] :]
        del self.send_requests[marks[2] :]

    def clear(self) -> None:
        self.drop_after((0, 0, 0))

    async def release(self, events: EventSink, jobs: JobSink) -> None:
        pending_events = list(self.events)
        pending_syncs, pending_sends = list(self.sync_requests), list(self.send_requests)
        self.clear()
        for email_id in pending_sends:
            await jobs.enqueue_send(email_id)
        for mailbox_id in pending_syncs:
            await jobs.enqueue_sync(mailbox_id)
        for workspace_id, event in pending_events:
            await events.publish(workspace_id, event)
