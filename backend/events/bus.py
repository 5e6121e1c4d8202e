"""Events travel over Redis pub/sub, one channel per workspace.

Every API process keeps exactly one Redis subscription (a pattern over all workspace
channels) and fans events out in memory to its websocket subscribers, so the number of
Redis connections does not grow with the number of subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from redis.asyncio import Redis

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "mailsync:events:"
QUEUE_SIZE = 1000


def channel_for(workspace_id: str) -> str:
    return f"{CHANNEL_PREFIX}{workspace_id}"


class EventBus:
    """The publishing side, used by API processes and workers alike."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def publish(self, workspace_id: str, event: dict[str, Any]) -> None:
        await self._redis.publish(channel_for(workspace_id), json.dumps(event, default=str))


class Subscriber(Protocol):
    """Takes a workspace's events from the hub; must not block (it runs in the listener)."""

    def deliver(self, event: dict[str, Any]) -> None: ...

    def __len__(self) -> int:
        """How many subscriptions it stands for (the websocket fan-out holds many)."""
        ...


class _QueueSubscriber:
    """One subscription reading its own queue (Apollo's multipart subscriptions over HTTP)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE_SIZE)

    def deliver(self, event: dict[str, Any]) -> None:
        if self.queue.full():
            # A stalled subscriber loses its oldest events rather than growing memory.
            self.queue.get_nowait()
        self.queue.put_nowait(event)

    def __len__(self) -> int:
        return 1


class EventHub:
    """The receiving side: one Redis listener per process, in-memory fan-out per workspace."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="event-hub")
            await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for subscribers in self._subscribers.values() for s in subscribers)

    def subscribers_of(self, workspace_id: str) -> int:
        """Subscriptions of one workspace registered here (a subscribe is not acknowledged on
        the wire, so tests wait for this before publishing)."""
        return sum(len(s) for s in self._subscribers.get(workspace_id, ()))

    @contextlib.asynccontextmanager
    async def subscribe(self, workspace_id: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        subscriber = _QueueSubscriber()
        self.attach(workspace_id, subscriber)
        try:
            yield subscriber.queue
        finally:
            self.detach(workspace_id, subscriber)

    def attach(self, workspace_id: str, subscriber: Subscriber) -> None:
        self._subscribers[workspace_id].add(subscriber)

    def detach(self, workspace_id: str, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(workspace_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[workspace_id]

    def _deliver(self, workspace_id: str, event: dict[str, Any]) -> None:
        for subscriber in list(self._subscribers.get(workspace_id, ())):
            try:
                subscriber.deliver(event)
            except Exception:
                log.exception("a subscriber of %s failed to take an event", workspace_id)

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            redis: Redis = Redis.from_url(self._redis_url)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.psubscribe(f"{CHANNEL_PREFIX}*")
                    self._ready.set()
                    backoff = 0.5
                    async for message in pubsub.listen():
                        if message.get("type") != "pmessage":
                            continue
                        channel = message["channel"]
                        channel = channel.decode() if isinstance(channel, bytes) else channel
                        try:
                            event = json.loads(message["data"])
                        except (ValueError, TypeError):
                            log.warning("dropping a malformed event on %s", channel)
                            continue
                        self._deliver(channel.removeprefix(CHANNEL_PREFIX), event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event listener lost Redis; reconnecting in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            finally:
                await redis.aclose()
