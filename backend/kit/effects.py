"""Side effects buffered during a unit of work and released only after it commits.

Each effect carries an id of its own: the unit of work stores it in the outbox with the
transaction, and the same id travels with an event, so a relayed copy of an event that was
already published is recognised and dropped by the receiving hub."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

EffectKind = Literal["send", "sync", "event"]


class EventSink(Protocol):
    async def publish(
        self, workspace_id: str, event: dict[str, Any], event_id: str | None = None
    ) -> None: ...


class JobSink(Protocol):
    async def enqueue_sync(self, mailbox_id: str, defer_seconds: float = 0) -> None: ...

    async def enqueue_send(self, email_id: str) -> None: ...


def new_effect_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Effect:
    """One job request or event. `target` is the email (send), mailbox (sync) or workspace
    (event) id."""

    kind: EffectKind
    target: str
    event: dict[str, Any] | None = None
    id: str = field(default_factory=new_effect_id)
    # A notice (see `AfterCommit.notify`) skips the outbox: a later one supersedes it.
    durable: bool = True

    async def release(self, events: EventSink, jobs: JobSink) -> None:
        """Hand the effect to Redis. Safe to repeat: jobs are keyed by their arq job id
        and events by `id`."""
        if self.kind == "send":
            await jobs.enqueue_send(self.target)
        elif self.kind == "sync":
            await jobs.enqueue_sync(self.target)
        else:
            await events.publish(self.target, self.event or {}, self.id)


@dataclass
class AfterCommit:
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sync_requests: list[str] = field(default_factory=list)
    send_requests: list[str] = field(default_factory=list)
    notices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def publish(self, workspace_id: object, event: dict[str, Any]) -> None:
        self.events.append((str(workspace_id), event))

    def notify(self, workspace_id: object, event: dict[str, Any]) -> None:
        """An event that the next one of its kind supersedes (a pass's summary): released
        after the commit like the others but not kept in the outbox, so a pass that found
        nothing writes no outbox row. One lost to a Redis outage is replaced by the next."""
        self.notices.append((str(workspace_id), event))

    def request_sync(self, mailbox_id: object) -> None:
        if str(mailbox_id) not in self.sync_requests:
            self.sync_requests.append(str(mailbox_id))

    def request_send(self, email_id: object) -> None:
        if str(email_id) not in self.send_requests:
            self.send_requests.append(str(email_id))

    def marks(self) -> tuple[int, int, int, int]:
        return (
            len(self.events),
            len(self.sync_requests),
            len(self.send_requests),
            len(self.notices),
        )

    def drop_after(self, marks: tuple[int, int, int, int]) -> None:
        """Forget what was buffered since `marks()` (a savepoint rolled back)."""
        del self.events[marks[0] :]
        del self.sync_requests[marks[1] :]
        del self.send_requests[marks[2] :]
        del self.notices[marks[3] :]

    def clear(self) -> None:
        self.drop_after((0, 0, 0, 0))

    def take(self) -> list[Effect]:
        """Everything buffered, in release order (sends, passes, then the events that tell
        of them), and an empty buffer."""
        taken = [Effect("send", email_id) for email_id in self.send_requests]
        taken += [Effect("sync", mailbox_id) for mailbox_id in self.sync_requests]
        taken += [Effect("event", ws, event) for ws, event in self.events]
        taken += [Effect("event", ws, event, durable=False) for ws, event in self.notices]
        self.clear()
        return taken

    async def release(self, events: EventSink, jobs: JobSink) -> None:
        """Release everything now, with no outbox (a process that writes no rows)."""
        for effect in self.take():
            await effect.release(events, jobs)
