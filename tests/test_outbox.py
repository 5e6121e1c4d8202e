"""Nothing is lost between a commit and Redis (issue 13, item 5): jobs and events are written
to the outbox with their transaction, released right after the commit, and relayed by the
worker when Redis was unreachable; the API's event reader resumes from its last-seen entry
after losing Redis, and tells subscribers when it cannot (Redis restarted empty).

The tests that stop Redis run their own server on a free port: the machine's shared one is
never touched."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlmodel import col, select

from backend.events import bus, outbox
from backend.events.bus import EventBus, EventHub
from backend.events.outbox import OutboxEntry
from backend.graphql.relay import to_global_id
from backend.mailboxes.service import status_event
from backend.mailboxes.tables import Mailbox, MailboxStatus
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings
from backend.sync.queue import sync_job_id
from tests.client import GQL, subscribe
from tests.conftest import LiveServer
from tests.event_stream import StreamReader
from tests.factories import Factory, Member
from tests.sync_helpers import wait_until
from tests.test_redis_restart import RedisServer
from worker.relay import relay_forever

STATUS_CHANGED = "subscription { mailboxStatusChanged { mailbox { id status } previousStatus } }"
EVENTS_MISSED = "subscription { eventsMissed { detectedAt hint } }"
DISCONNECT = """
mutation($id: ID!) {
  disconnectMailbox(input: {id: $id}) { mailbox { status } userErrors { code message } }
}
"""


def _gid(kind: str, row_id: object) -> str:
    return str(to_global_id(kind, row_id))  # type: ignore[arg-type]


async def _outbox_rows(runtime: Runtime, *targets: object) -> list[OutboxEntry]:
    async with runtime.db.sessionmaker() as session:
        rows = await session.scalars(
            select(OutboxEntry).where(col(OutboxEntry.target).in_([str(t) for t in targets]))
        )
        return list(rows)


async def _queued_jobs(redis: Redis) -> list[bytes]:
    return list(await redis.zrange("arq:queue", 0, -1))


@dataclass
class Stack:
    """An API process and a worker-side runtime on a Redis server of the test's own."""

    redis: RedisServer
    api: LiveServer
    runtime: Runtime

    def client(self) -> Redis:
        return Redis(port=self.redis.port)


@pytest.fixture
async def stack(tmp_path: Path, settings: Settings) -> AsyncIterator[Stack]:
    server = RedisServer(tmp_path)
    await server.start()
    own = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{server.port}/0"})
    api = LiveServer(own)
    runtime = await Runtime.create(own, jobs=JobQueue)
    try:
        await api.start()
        yield Stack(server, api, runtime)
    finally:
        with contextlib.suppress(Exception):
            await api.stop()
        await runtime.close()
        await server.stop()


@contextlib.asynccontextmanager
async def _relaying(runtime: Runtime) -> AsyncIterator[None]:
    """The worker's relay loop, as `mailsync worker` runs it, at a short interval."""
    task = asyncio.create_task(relay_forever(runtime, 0.2))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.e2e  # runs its own Redis server
async def test_a_mutation_committed_while_redis_is_down_succeeds_and_its_job_and_event_arrive_after_a_restart(
    stack: Stack, factory: Factory
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    gql = GQL(stack.api.url)
    hub = stack.api.app.state.runtime.hub
    async with subscribe(
        stack.api.ws_url,
        owner.token,
        STATUS_CHANGED,
        subscribers=stack.api.subscribers(owner.workspace.id),
    ) as statuses:
        gaps = hub.gaps
        await stack.redis.stop()
        answer = await gql(DISCONNECT, {"id": _gid("Mailbox", mailbox.id)}, token=owner.token)
        # The commit succeeded, so the mutation did: the release is the relay's to finish.
        assert answer["disconnectMailbox"] == {
            "mailbox": {"status": "DISCONNECTED"},
            "userErrors": [],
        }
        kinds = sorted(
            row.kind for row in await _outbox_rows(stack.runtime, mailbox.id, owner.workspace.id)
        )
        assert kinds == ["event", "sync"]

        await stack.redis.start()  # same port, no data: the restart lost everything
        async with _relaying(stack.runtime):
            event = (await statuses.next())["data"]["mailboxStatusChanged"]
            redis = stack.client()
            try:

                async def queued() -> bool:
                    return sync_job_id(str(mailbox.id)).encode() in await _queued_jobs(redis)

                await wait_until(queued, 60)
            finally:
                await redis.aclose()

            async def relayed() -> bool:
                return not await _outbox_rows(stack.runtime, mailbox.id, owner.workspace.id)

            await wait_until(relayed, 60)
    assert event == {
        "mailbox": {"id": _gid("Mailbox", mailbox.id), "status": "DISCONNECTED"},
        "previousStatus": mailbox.status.value,
    }
    # Redis came back empty: the reader could not know what it missed, and said so.
    assert hub.gaps == gaps + 1


@contextlib.asynccontextmanager
async def _readers_locked_out(server: RedisServer) -> AsyncIterator[Redis]:
    """Cut every stream reader's connection and keep readers out (new connections must
    authenticate) until the block ends; yields a client that may still publish."""
    admin = Redis(port=server.port)
    password = uuid.uuid4().hex
    await admin.config_set("requirepass", password)
    await admin.aclose()
    publisher = Redis(port=server.port, password=password)
    try:
        readers = [c for c in await publisher.client_list() if c["cmd"] == "xread"]
        assert readers
        for reader in readers:
            await publisher.client_kill_filter(_id=reader["id"])

        async def readers_gone() -> bool:
            return not [c for c in await publisher.client_list() if c["cmd"] == "xread"]

        await wait_until(readers_gone, 60)
        yield publisher
        await publisher.config_set("requirepass", "")
    finally:
        await publisher.aclose()


@pytest.mark.e2e  # runs its own Redis server
async def test_an_event_published_while_the_api_has_lost_redis_reaches_subscribers_after_it_reconnects(
    stack: Stack, factory: Factory
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    hub = stack.api.app.state.runtime.hub
    async with subscribe(
        stack.api.ws_url,
        owner.token,
        STATUS_CHANGED,
        subscribers=stack.api.subscribers(owner.workspace.id),
    ) as statuses:
        gaps = hub.gaps
        async with _readers_locked_out(stack.redis) as publisher:
            mailbox.status = MailboxStatus.ERROR
            await EventBus(publisher).publish(
                str(owner.workspace.id), status_event(mailbox, MailboxStatus.ACTIVE)
            )
        event = (await statuses.next())["data"]["mailboxStatusChanged"]
    assert event == {
        "mailbox": {"id": _gid("Mailbox", mailbox.id), "status": "PENDING"},
        "previousStatus": "ACTIVE",
    }
    assert hub.gaps == gaps  # resumed from where it stopped: nothing was missed


@pytest.mark.e2e  # runs its own Redis server
async def test_subscribers_are_told_when_the_stream_was_trimmed_past_their_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path)
    await server.start()
    hub = EventHub(f"redis://127.0.0.1:{server.port}/0")
    client = Redis(port=server.port)
    try:
        await hub.start()
        async with hub.subscribe("w") as queue:
            await EventBus(client).publish("w", {"type": "first"})
            assert await asyncio.wait_for(queue.get(), 30) == {"type": "first"}
            # While the reader is away, far more is published than the stream keeps.
            monkeypatch.setattr(bus, "STREAM_MAXLEN", 10)
            async with _readers_locked_out(server) as publisher:
                for n in range(1000):
                    await EventBus(publisher).publish("w", {"type": "later", "n": n})
                assert await publisher.xlen(bus.STREAM) < 1000
            gap = await asyncio.wait_for(queue.get(), 30)
            assert gap["type"] == bus.GAP["type"]
            later = await asyncio.wait_for(queue.get(), 30)
    finally:
        await hub.stop()
        await client.aclose()
        await server.stop()
    assert later["type"] == "later" and later["n"] > 0  # the oldest were trimmed away
    assert hub.gaps == 1


@pytest.mark.e2e  # runs its own Redis server
async def test_a_websocket_subscriber_is_told_when_the_stream_was_trimmed_past_the_api_reader(
    stack: Stack, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    hub = stack.api.app.state.runtime.hub
    subscribers = stack.api.subscribers(owner.workspace.id)
    async with (
        subscribe(stack.api.ws_url, owner.token, EVENTS_MISSED, subscribers=subscribers) as told,
        subscribe(stack.api.ws_url, owner.token, STATUS_CHANGED, subscribers=subscribers) as seen,
    ):
        # The reader has a position in the stream (an entry it read) that trimming can pass.
        await stack.runtime.publish(
            str(owner.workspace.id), status_event(mailbox, MailboxStatus.ACTIVE)
        )
        assert (await seen.next())["data"]["mailboxStatusChanged"]["previousStatus"] == "ACTIVE"
        gaps = hub.gaps
        monkeypatch.setattr(bus, "STREAM_MAXLEN", 10)
        async with _readers_locked_out(stack.redis) as publisher:
            for n in range(1000):
                await EventBus(publisher).publish("elsewhere", {"type": "later", "n": n})
            assert await publisher.xlen(bus.STREAM) < 1000
        event = (await told.next())["data"]["eventsMissed"]
    assert event["hint"]
    assert hub.gaps == gaps + 1


async def _workspace_with_mailboxes(factory: Factory, count: int) -> tuple[Member, list[Mailbox]]:
    owner = await factory.workspace()
    return owner, [
        await factory.mailbox(owner, f"box{i}-{uuid.uuid4().hex[:6]}@crm.test")
        for i in range(count)
    ]


async def test_the_outbox_relay_repeats_what_it_cannot_confirm_without_doubling_jobs_or_events(
    api: LiveServer, runtime: Runtime, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, (first, second) = await _workspace_with_mailboxes(factory, 2)
    async with subscribe(
        api.ws_url, owner.token, STATUS_CHANGED, subscribers=api.subscribers(owner.workspace.id)
    ) as statuses:
        # Released to Redis, but the rows could not be deleted (the database hiccupped):
        # the relay releases them again.
        forget = outbox.forget

        async def fails(*_args: object) -> None:
            raise sa.exc.OperationalError("DELETE", {}, Exception("database is locked"))

        monkeypatch.setattr(outbox, "forget", fails)
        async with runtime.unit_of_work() as work:
            row = await work.session.get(Mailbox, first.id)
            assert row is not None
            previous, row.status = row.status, MailboxStatus.ERROR
            work.effects.publish(owner.workspace.id, status_event(row, previous))
            work.effects.request_sync(first.id)
            work.effects.request_send(uuid.UUID(int=0))
        assert len(await _outbox_rows(runtime, first.id, owner.workspace.id)) == 2
        monkeypatch.setattr(outbox, "forget", forget)

        assert await runtime.relay_outbox(older_than=0) >= 3
        assert await _outbox_rows(runtime, first.id, owner.workspace.id, uuid.UUID(int=0)) == []
        jobs = await _queued_jobs(runtime.redis)
        assert jobs.count(sync_job_id(str(first.id)).encode()) == 1
        assert jobs.count(b"send:" + str(uuid.UUID(int=0)).encode()) == 1

        # The relayed copy of the event is dropped by the hub: the next event is a later one.
        async with runtime.unit_of_work() as work:
            row = await work.session.get(Mailbox, second.id)
            assert row is not None
            previous, row.status = row.status, MailboxStatus.ERROR
            work.effects.publish(owner.workspace.id, status_event(row, previous))
        seen = [
            (await statuses.next())["data"]["mailboxStatusChanged"]["mailbox"]["id"]
            for _ in range(2)
        ]
    assert seen == [_gid("Mailbox", first.id), _gid("Mailbox", second.id)]


async def test_a_commit_whose_release_cannot_reach_redis_succeeds_and_the_relay_delivers_the_rest(
    runtime: Runtime, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, (mailbox,) = await _workspace_with_mailboxes(factory, 1)
    listen = await StreamReader(runtime.settings.redis_url, owner.workspace.id).start()
    try:
        down = RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        async def unreachable(*_args: object, **_kwargs: object) -> None:
            raise down

        with monkeypatch.context() as patch:
            patch.setattr(runtime.jobs, "enqueue_sync", unreachable)
            async with runtime.unit_of_work() as work:  # raises nothing: the commit stands
                row = await work.session.get(Mailbox, mailbox.id)
                assert row is not None
                row.status = MailboxStatus.ERROR
                work.effects.publish(owner.workspace.id, {"type": "kept", "n": 1})
                work.effects.request_sync(mailbox.id)
        async with runtime.db.sessionmaker() as session:
            stored = await session.get(Mailbox, mailbox.id)
            assert stored is not None and stored.status == MailboxStatus.ERROR
        assert sorted(
            r.kind for r in await _outbox_rows(runtime, mailbox.id, owner.workspace.id)
        ) == [
            "event",
            "sync",
        ]
        assert sync_job_id(str(mailbox.id)).encode() not in await _queued_jobs(runtime.redis)

        assert await runtime.relay_outbox(older_than=0) >= 2
        assert await _outbox_rows(runtime, mailbox.id, owner.workspace.id) == []
        assert sync_job_id(str(mailbox.id)).encode() in await _queued_jobs(runtime.redis)
        assert await listen.read() == [{"type": "kept", "n": 1}]
    finally:
        await listen.aclose()


async def test_a_notice_is_released_after_the_commit_without_an_outbox_row(
    runtime: Runtime, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, (mailbox,) = await _workspace_with_mailboxes(factory, 1)
    listen = await StreamReader(runtime.settings.redis_url, owner.workspace.id).start()
    try:

        async def unreachable(*_args: object, **_kwargs: object) -> None:
            raise RedisConnectionError("Connection refused.")

        with monkeypatch.context() as patch:
            patch.setattr(runtime.bus, "publish", unreachable)
            async with runtime.unit_of_work() as work:
                work.effects.notify(owner.workspace.id, {"type": "syncPassCompleted", "n": 1})
        # Unlike an event, a notice that Redis did not take leaves nothing for the relay.
        assert await _outbox_rows(runtime, mailbox.id, owner.workspace.id) == []

        async with runtime.unit_of_work() as work:
            work.effects.notify(owner.workspace.id, {"type": "syncPassCompleted", "n": 2})
        assert await listen.read() == [{"type": "syncPassCompleted", "n": 2}]
        assert await _outbox_rows(runtime, mailbox.id, owner.workspace.id) == []
    finally:
        await listen.aclose()
