"""Events travel over one Redis Stream shared by every workspace.

Publishers append (XADD, trimmed to about `STREAM_MAXLEN` entries); every API process keeps
exactly one reader that follows the stream from the last entry it saw (XREAD) and fans events
out in memory to its subscribers, so the number of Redis connections does not grow with the
number of subscriptions, and a reader that lost Redis for a while resumes where it stopped:
events published meanwhile are delivered late, not lost.

Each entry carries the event's id; a copy published again by the outbox relay (see
`backend/events/outbox.py`) is recognised and dropped. When the reader cannot resume (the
stream was trimmed past it, or Redis restarted and lost its data), the hub tells every
subscriber with a `GAP` event: whatever they show may be stale and is to be read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from redis.asyncio import Redis

from backend.kit import clock

log = logging.getLogger(__name__)

STREAM = "mailsync:events"
# A random value set by the first reader of an empty Redis: when it changes, Redis lost its
# data (a restart without persistence, a flush) and readers cannot know what they missed.
EPOCH_KEY = "mailsync:events:epoch"
# About this many entries are kept: a reader further behind than that has missed some.
STREAM_MAXLEN = 10_000
QUEUE_SIZE = 1000
READ_COUNT = 500
# A blocked read returns this often (ms) even when nothing happens, to check the epoch.
READ_BLOCK_MS = 5_000
# Ids of recently delivered events, to drop relayed copies.
SEEN_IDS = 20_000
# Sent to every subscriber when events may have been missed (see the module's docstring),
# with `GAP_AT`: when the hub noticed, the same for every subscriber of one gap.
GAP: dict[str, Any] = {"type": "eventsMissed"}
GAP_AT = "detectedAt"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class EventBus:
    """The publishing side, used by API processes and workers alike."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def publish(
        self, workspace_id: str, event: dict[str, Any], event_id: str | None = None
    ) -> None:
        await self._redis.xadd(
            STREAM,
            {
                "id": event_id or uuid.uuid4().hex,
                "workspace": workspace_id,
                "event": json.dumps(event, default=str),
            },
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )


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
        # Where the reader resumes, and the Redis data set (epoch) that position belongs to.
        self._last_id: str | None = None
        self._epoch: str | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        # Times subscribers were told they may have missed events.
        self.gaps = 0

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

    def notify_gap(self) -> None:
        """Tell every subscriber that events may have been missed."""
        self.gaps += 1
        at = clock.now().isoformat()
        for workspace_id in list(self._subscribers):
            self._deliver(workspace_id, {**GAP, GAP_AT: at})

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            redis: Redis = Redis.from_url(self._redis_url)
            try:
                await self._resume(redis)
                self._ready.set()
                backoff = 0.5
                while True:
                    await self._read(redis)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event reader lost Redis (%r); reconnecting in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
            finally:
                await redis.aclose()

    async def _current_epoch(self, redis: Redis) -> str:
        epoch = await redis.get(EPOCH_KEY)
        if epoch is None:
            await redis.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
            epoch = await redis.get(EPOCH_KEY)
        return _text(epoch or b"")

    async def _resume(self, redis: Redis) -> None:
        """Find where to read from after (re)connecting, telling subscribers of a gap."""
        epoch = await self._current_epoch(redis)
        if self._epoch is None or self._last_id is None:
            # First start: only what is published from now on.
            last = await redis.xrevrange(STREAM, count=1)
            self._last_id = _text(last[0][0]) if last else "0-0"
            self._epoch = epoch
        elif epoch != self._epoch:
            self._lost_data(epoch)
        elif await self._trimmed_past(redis, self._last_id):
            log.warning("the event stream was trimmed past this reader: events were missed")
            self.notify_gap()

    def _lost_data(self, epoch: str) -> None:
        # Everything in the new data set is news to this reader; what the old one held that
        # was not read is gone.
        log.warning("Redis lost the event stream (restart or flush): events may have been missed")
        self._epoch = epoch
        self._last_id = "0-0"
        self.notify_gap()

    async def _trimmed_past(self, redis: Redis, last_id: str) -> bool:
        """Whether the trimming of the stream may have removed entries after `last_id`:
        trimming removes the oldest first, so it did not while that entry is still there."""
        if last_id == "0-0":
            return False
        return not await redis.xrange(STREAM, min=last_id, max=last_id, count=1)

    async def _read(self, redis: Redis) -> None:
        assert self._last_id is not None
        # The epoch is read on the same connection just before the read: a Redis that
        # restarted in between breaks the connection, so no read of a new data set goes by
        # with an old position.
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(EPOCH_KEY)
            pipe.xread({STREAM: self._last_id}, count=READ_COUNT, block=READ_BLOCK_MS)
            epoch, batches = await pipe.execute()
        if epoch is None or _text(epoch) != self._epoch:
            self._lost_data(await self._current_epoch(redis))
            return
        entries = batches[0][1] if batches else []
        before = self._last_id
        for entry_id, fields in entries:
            self._last_id = _text(entry_id)
            self._accept(fields)
        # A full batch means this reader is behind: it may have fallen off the trimmed end.
        if len(entries) == READ_COUNT and await self._trimmed_past(redis, before):
            log.warning("the event stream was trimmed past this reader: events were missed")
            self.notify_gap()

    def _accept(self, fields: dict[bytes, bytes]) -> None:
        event_id = _text(fields.get(b"id", b""))
        if event_id in self._seen:
            return  # a relayed copy
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        try:
            event = json.loads(fields[b"event"])
            workspace_id = _text(fields[b"workspace"])
        except (KeyError, ValueError, TypeError):
            log.warning("dropping a malformed event %s", event_id)
            return
        self._deliver(workspace_id, event)
