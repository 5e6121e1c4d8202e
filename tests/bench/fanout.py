"""Benchmark: one `emailReceived` event to N idle websocket subscribers, mailsync against a
plain `websockets` server sending the same frame; p50/p99 delivery and RSS per subscriber.

    uv run python -m tests.bench.fanout [--subscribers 1000] [--events 5]

mailsync runs as `mailsync serve` (one process, PostgreSQL in a fresh database, Redis); half
the subscribers are the mailbox's owner and half a colleague (the mailbox shares subjects
only, so R17 makes two payloads). The baseline is a plain `websockets` server in its own
process that relays what it gets on a Redis channel to every connection
(`websockets.broadcast`): the same Redis hop, the same frame, no GraphQL. Both serve
without per-message deflate. A delivery's latency runs from the publish to the frame read
by the client (one client process for both). RSS per subscriber is the server process's
growth from before the first connection to N idle subscriptions, divided by N.
The last line is `fanout ratio: <mailsync p99 / baseline p99>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import websockets
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from backend import migrations
from backend.events.bus import EventBus
from backend.mail.service import email_received_event
from backend.mailboxes.tables import EmailVisibility, Mailbox
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings
from tests.factories import Factory, raw_message

SUBSCRIPTION = """subscription {
  emailReceived {
    email { id subject snippet sentAt from { email name contact { name } } to { email } }
    contacts { id name }
    cursor
  }
}"""
BASELINE_CHANNEL = "mailsync:bench:fanout"
SECRET = "f" * 40
CONNECT_BATCH = 200
DEADLINE = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Receivers:
    """Counts and times the frames of one event across every client."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.published_at = 0.0
        self.latencies: list[float] = []
        self.count = 0
        self.all_in = asyncio.Event()
        self.measuring = False
        self.last: list[float] = []  # per event: when its last frame was read

    def expect(self) -> None:
        self.count = 0
        self.all_in.clear()
        self.published_at = time.perf_counter()

    def got(self) -> None:
        if self.measuring:
            self.latencies.append(time.perf_counter() - self.published_at)
        self.count += 1
        if self.count == self.subscribers:
            self.all_in.set()


async def _read(
    ws: ClientConnection, receivers: Receivers, is_frame: Callable[[str], bool]
) -> None:
    try:
        async for message in ws:
            if isinstance(message, str) and is_frame(message):
                receivers.got()
    except websockets.ConnectionClosed:
        pass


async def _connect_all(
    count: int, connect: Callable[[int], Awaitable[ClientConnection]]
) -> list[ClientConnection]:
    connections: list[ClientConnection] = []
    for start in range(0, count, CONNECT_BATCH):
        batch = range(start, min(count, start + CONNECT_BATCH))
        connections += await asyncio.gather(*(connect(i) for i in batch))
    return connections


async def _measure(
    connections: list[ClientConnection],
    receivers: Receivers,
    is_frame: Callable[[str], bool],
    publish: Callable[[], Awaitable[None]],
    events: int,
) -> None:
    readers = [asyncio.create_task(_read(ws, receivers, is_frame)) for ws in connections]
    try:
        for index in range(events + 1):  # the first event warms up and is not counted
            receivers.measuring = index > 0
            receivers.expect()
            await publish()
            try:
                await asyncio.wait_for(receivers.all_in.wait(), DEADLINE)
                if receivers.measuring:
                    receivers.last.append(time.perf_counter() - receivers.published_at)
            except TimeoutError:
                raise SystemExit(
                    f"only {receivers.count} of {receivers.subscribers} subscribers got event {index}"
                ) from None
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def _close_all(connections: list[ClientConnection]) -> None:
    for ws in connections:
        ws.transport.abort()


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_mailsync(
    settings: Settings,
    tokens: list[str],
    workspace_id: str,
    event: dict[str, Any],
    count: int,
    events: int,
) -> tuple[list[float], float, str]:
    port = _free_port()
    env = {
        **os.environ,
        "MAILSYNC_ENV": "test",
        "MAILSYNC_DATABASE_URL": settings.database_url,
        "MAILSYNC_REDIS_URL": settings.redis_url,
        "MAILSYNC_SECRET_KEY": SECRET,
        "MAILSYNC_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], env=env
    )
    url = f"http://127.0.0.1:{port}"
    redis = Redis.from_url(settings.redis_url)
    connections: list[ClientConnection] = []
    try:
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await _wait_for(ready, "the API to start")
            rss_before = _rss_kb(process.pid)

            async def connect(i: int) -> ClientConnection:
                ws = await websockets.connect(
                    f"ws://127.0.0.1:{port}/graphql",
                    subprotocols=[Subprotocol("graphql-transport-ws")],
                    compression=None,
                    open_timeout=DEADLINE,
                    max_queue=None,
                )
                token = tokens[i % len(tokens)]
                await ws.send(
                    json.dumps(
                        {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
                    )
                )
                ack = json.loads(await ws.recv())
                assert ack["type"] == "connection_ack", ack
                await ws.send(
                    json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION}})
                )
                return ws

            connections = await _connect_all(count, connect)

            async def registered() -> bool:
                return int((await http.get("/readyz")).json()["subscribers"]) >= count

            await _wait_for(registered, "the subscriptions to register")
            await asyncio.sleep(2)  # idle: let allocations settle before reading RSS
            rss_per_subscriber = (_rss_kb(process.pid) - rss_before) / count

            sample: list[str] = []
            receivers = Receivers(count)

            def is_frame(message: str) -> bool:
                if not sample:
                    sample.append(message)
                return '"type":"next"' in message

            async def publish() -> None:
                await EventBus(redis).publish(workspace_id, event)

            await _measure(connections, receivers, is_frame, publish, events)
            print("mailsync, last frame per event (ms):", [round(t * 1000) for t in receivers.last])
            return receivers.latencies, rss_per_subscriber, sample[0]
    finally:
        _stop(process)
        await _close_all(connections)
        await redis.aclose()


BASELINE_SERVER = """
import asyncio, sys
import websockets
from redis.asyncio import Redis

async def main(port, redis_url, channel):
    clients = set()

    async def handler(ws):
        await ws.recv()  # hello: registered once answered
        clients.add(ws)
        await ws.send("ok")
        try:
            await ws.wait_closed()
        finally:
            clients.discard(ws)

    async def relay():
        redis = Redis.from_url(redis_url)
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    websockets.broadcast(clients, message["data"].decode())

    async with websockets.serve(handler, "127.0.0.1", port, compression=None):
        print("listening", flush=True)
        await relay()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"""


async def run_baseline(
    redis_url: str, frame: str, count: int, events: int
) -> tuple[list[float], float]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", BASELINE_SERVER, str(port), redis_url, BASELINE_CHANNEL],
        stdout=subprocess.PIPE,
    )
    redis = Redis.from_url(redis_url)
    connections: list[ClientConnection] = []
    try:
        assert process.stdout is not None
        await asyncio.to_thread(process.stdout.readline)
        rss_before = _rss_kb(process.pid)

        async def connect(i: int) -> ClientConnection:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}", compression=None, open_timeout=DEADLINE, max_queue=None
            )
            await ws.send("hello")
            assert await ws.recv() == "ok"
            return ws

        connections = await _connect_all(count, connect)
        await asyncio.sleep(2)
        rss_per_subscriber = (_rss_kb(process.pid) - rss_before) / count
        receivers = Receivers(count)

        async def publish() -> None:
            await redis.publish(BASELINE_CHANNEL, frame)

        await _measure(connections, receivers, lambda m: True, publish, events)
        print("baseline, last frame per event (ms):", [round(t * 1000) for t in receivers.last])
        return receivers.latencies, rss_per_subscriber
    finally:
        _stop(process, signal.SIGKILL)
        await _close_all(connections)
        await redis.aclose()


async def setup(settings: Settings) -> tuple[list[str], str, dict[str, Any]]:
    """A workspace, its owner and a colleague, an email on a contact's timeline in a mailbox
    that shares subjects only: the event and the subscribers' tokens."""
    await asyncio.to_thread(migrations.upgrade, settings.database_url)
    runtime = await Runtime.create(settings, jobs=JobQueue)
    try:
        factory = Factory(runtime)
        owner = await factory.workspace()
        colleague = await factory.member(owner)
        mailbox = await factory.mailbox(owner)
        contact = await factory.contact(owner, "client@bench.test", "Bench Client")
        email = await factory.email(
            owner,
            mailbox,
            raw_message("Bench Client <client@bench.test>", [owner.email], "Fan-out", "Hello"),
        )
        async with runtime.db.transaction() as session:
            row = await session.get(Mailbox, mailbox.id)
            assert row is not None
            row.visibility = EmailVisibility.SUBJECT_ONLY
        event = email_received_event(email.id, email.thread_id, mailbox.id, [contact.id])
        return [owner.token, colleague.token], str(owner.workspace.id), event
    finally:
        await runtime.close()


def _report(name: str, latencies: list[float], rss_kb: float) -> float:
    p50 = statistics.median(latencies) * 1000
    p99 = _percentile(latencies, 0.99) * 1000
    print(f"{name:<22} p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   RSS {rss_kb:6.1f} KB/subscriber")
    return p99


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=5)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "MAILSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("MAILSYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/14"),
    )
    args = parser.parse_args()

    name = f"mailsync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = args.postgres_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    settings = Settings(
        env="test",
        database_url=f"{base}/{name}",
        redis_url=args.redis_url,
        secret_key=SECRET,
        _env_file=None,
    )  # type: ignore[call-arg]
    try:
        tokens, workspace_id, event = await setup(settings)
        product, product_rss, frame = await run_mailsync(
            settings, tokens, workspace_id, event, args.subscribers, args.events
        )
        baseline, baseline_rss = await run_baseline(
            args.redis_url, frame, args.subscribers, args.events
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"subscribers: {args.subscribers}, events: {args.events}, frame: {len(frame)} bytes")
    base_p99 = _report("plain websockets", baseline, baseline_rss)
    product_p99 = _report("mailsync", product, product_rss)
    print(f"fanout ratio: {product_p99 / base_p99:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
