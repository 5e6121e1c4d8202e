"""Benchmark: IMAP IDLE freshness and the memory of held IDLE connections.

    uv run python -m tests.bench.imap_freshness [--count 50] [--interval 0.5] [--idle 200]

Starts the real mail servers (Dovecot, Postfix; backend/sandbox/mailserver.py), a fresh
SQLite database, the IDLE supervisor and a worker in this process, against
MAILSYNC_REDIS_URL (default db 14). A contact's message goes through SMTP into Postfix,
LMTP into Dovecot; IDLE announces it, the worker files it and `emailReceived` is published.
Freshness is measured from the SMTP hand-off to the event on Redis (what the API relays to
subscribers). Baseline, measured in the same run: from the SMTP hand-off to the EXISTS
response on a bare IDLE connection, i.e. what the mail servers themselves take.
Aim: p99 under 2 seconds. Memory: Python heap (tracemalloc) per held IDLE connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

from redis.asyncio import Redis

from backend import migrations
from backend.auth.tables import User
from backend.contacts import service as contacts_service
from backend.kit.effects import AfterCommit
from backend.mail.tables import Email
from backend.mailboxes import service as mailboxes_service
from backend.providers.base import Provider
from backend.providers.imap.client import ImapConfig, close_imap, open_imap
from backend.runtime import Runtime
from backend.sandbox.mailserver import MailServer
from backend.sending.queue import JobQueue
from backend.settings import Settings
from backend.sync.idle import IdleSupervisor
from backend.workspaces import service as workspaces_service
from tests.worker import live_worker

PASSWORD = "bench-password"
CONTACT = "probe@client.test"


def _message(to: str, subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Probe <{CONTACT}>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="client.test")
    message["Date"] = formatdate(usegmt=True)
    message.set_content(f"{subject}\n\nAn IDLE freshness probe.")
    return message.as_bytes()


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, round(fraction * (len(values) - 1)))]


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name} over {len(values)} messages: p50 {percentile(values, 0.5):.3f} s, "
        f"p99 {percentile(values, 0.99):.3f} s, max {values[-1]:.3f} s, "
        f"mean {statistics.fmean(values):.3f} s"
    )


def config(server: MailServer, address: str) -> ImapConfig:
    return ImapConfig(
        email_address=address,
        username=address,
        password=PASSWORD,
        imap_host="127.0.0.1",
        imap_port=server.ports.imaps,
        smtp_host="127.0.0.1",
        smtp_port=server.ports.submissions,
    )


async def baseline(server: MailServer, ca: str, count: int, interval: float) -> list[float]:
    """SMTP hand-off to EXISTS on a bare IDLE connection."""
    address = "baseline@example.test"
    server.add_user(address, PASSWORD)
    client = await open_imap(config(server, address), ca)
    await client.select("INBOX")
    latencies = []
    try:
        for n in range(count):
            idle = await client.idle_start(timeout=60)
            started = time.perf_counter()
            await server.deliver(CONTACT, [address], _message(address, f"Baseline {n}"))
            while True:
                lines = await client.wait_server_push(timeout=30)
                if any(b"EXISTS" in bytes(line) for line in lines):
                    break
            latencies.append(time.perf_counter() - started)
            client.idle_done()
            await asyncio.wait_for(idle, 10)
            await asyncio.sleep(interval)
    finally:
        await close_imap(client)
    return sorted(latencies)


async def freshness(
    runtime: Runtime, server: MailServer, count: int, interval: float
) -> list[float]:
    async with runtime.db.transaction() as session:
        workspace, owner = await workspaces_service.create_workspace(
            session, "Bench", "owner@crm.test", "Owner"
        )
        user = await session.get(User, owner.id)
        assert user is not None
        from backend.auth.service import Viewer

        await contacts_service.create_contact(
            session, Viewer(user=user, workspace=workspace), email=CONTACT, name="Probe"
        )
        address = "owner@example.test"
        server.add_user(address, PASSWORD)
        mailbox = await mailboxes_service.connect_mailbox(
            session,
            AfterCommit(),
            runtime.settings.secret,
            owner=user,
            provider=Provider.IMAP,
            email_address=address,
            credentials=config(server, address).credentials(),
        )
        mailbox_id = mailbox.id
        workspace_id = workspace.id
    sent_at: dict[str, float] = {}
    latencies: dict[str, float] = {}
    redis = Redis.from_url(runtime.settings.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"mailsync:events:{workspace_id}")

    async def receive() -> None:
        while len(latencies) < count:
            frame = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if not frame:
                continue
            event = json.loads(frame["data"])
            if event.get("type") != "emailReceived":
                continue
            arrived = time.perf_counter()
            async with runtime.db.sessionmaker() as session:
                row = await session.get(Email, uuid.UUID(event["emailId"]))
            subject = row.subject if row is not None else None
            if subject in sent_at and subject not in latencies:
                latencies[subject] = arrived - sent_at[subject]

    idle = IdleSupervisor(runtime, refresh_seconds=1)
    supervisor = asyncio.create_task(idle.run())
    try:
        async with live_worker(runtime):
            while (watcher := idle.watchers.get(mailbox_id)) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await watcher.connected.wait()
            await asyncio.sleep(1)  # the pass that follows the connection
            receiver = asyncio.create_task(receive())
            for n in range(count):
                subject = f"IDLE probe {n}"
                sent_at[subject] = time.perf_counter()
                await server.deliver(CONTACT, [address], _message(address, subject))
                await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(receiver, timeout=60)
            except TimeoutError:
                print(f"{count - len(latencies)} of {count} messages never arrived within 60 s")
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await pubsub.aclose()
        await redis.aclose()
    return sorted(latencies.values())


async def memory(server: MailServer, ca: str, connections: int) -> float:
    """Heap bytes per held IDLE connection (TLS, INBOX selected, IDLE pending)."""
    addresses = [f"idle{n}@example.test" for n in range(connections)]
    for address in addresses:
        server.add_user(address, PASSWORD)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = []
    for address in addresses:
        client = await open_imap(config(server, address), ca)
        await client.select("INBOX")
        await client.idle_start(timeout=600)
        held.append(client)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for client in held:
        client.idle_done()
        await close_imap(client)
    return grown / connections


async def run(count: int, interval: float, connections: int) -> None:
    server = MailServer()
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="mailsync-bench-"))
    url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    await asyncio.to_thread(migrations.upgrade, url)
    settings = Settings(
        env="test",
        database_url=url,
        redis_url=os.environ.get("MAILSYNC_REDIS_URL", "redis://127.0.0.1:6379/14"),
        secret_key="bench-secret-key-that-is-long-enough-0123456789",  # type: ignore[arg-type]
        imap_ca_file=str(server.cert),
        log_level="WARNING",
    )
    runtime = await Runtime.create(settings, jobs=JobQueue)
    try:
        base = await baseline(server, str(server.cert), count, interval)
        fresh = await freshness(runtime, server, count, interval)
        per_connection = await memory(server, str(server.cert), connections)
    finally:
        await runtime.close()
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    if not fresh:
        raise SystemExit("no emailReceived event arrived")
    print(summary("baseline (SMTP to IDLE EXISTS)", base))
    print(summary("IDLE freshness (SMTP to emailReceived)", fresh))
    print(f"memory per held IDLE connection: {per_connection / 1024:.1f} KiB ({connections} held)")
    print(f"imap_freshness ratio: {percentile(fresh, 0.99) / percentile(base, 0.99):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between messages")
    parser.add_argument("--idle", type=int, default=200, help="IDLE connections to hold")
    args = parser.parse_args()
    asyncio.run(run(args.count, args.interval, args.idle))


if __name__ == "__main__":
    main()
