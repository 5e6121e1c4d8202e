"""Benchmark: messages per second through the whole sync pipeline, PostgreSQL and SQLite.

    uv run python -m tests.bench.ingest [--count 1000] [--postgres-url postgresql://...]

Files N realistic messages (5-50 KB, multipart/alternative with quoted-printable text and
HTML, one in ten with an attachment) through a real sync pass (provider double, parse,
rules, storage, cursor) and prints the rate; in the same run it prints the rate of bare
`BytesParser(policy=compat32).parsebytes` over the same bytes, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
import uuid
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import compat32
from email.utils import format_datetime, make_msgid
from pathlib import Path

import asyncpg

from backend import migrations
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mailboxes import service as mailboxes_service
from backend.providers.base import Provider
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings
from backend.sync.jobs import run_pass
from backend.workspaces import service as workspaces_service
from tests.providers import fake_provider

WORDS = [
    "proposal",
    "invoice",
    "meeting",
    "quarter",
    "pipeline",
    "renewal",
    "contract",
    "shipping",
    "discount",
    "timeline",
    "budget",
    "approval",
    "schedule",
    "follow-up",
    "pricing",
    "support",
    "onboarding",
    "demo",
]


def make_messages(count: int, user: str, contacts: list[str], seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    messages = []
    start = now()
    for i in range(count):
        size = rng.randint(5_000, 50_000)
        words = " ".join(rng.choice(WORDS) for _ in range(size // 14))
        text = "\n".join(words[j : j + 76] for j in range(0, len(words), 76))
        msg = EmailMessage()
        contact = rng.choice(contacts)
        incoming = rng.random() < 0.6
        msg["From"] = f"Client {i} <{contact}>" if incoming else user
        msg["To"] = user if incoming else contact
        msg["Subject"] = f"Re: {rng.choice(WORDS)} {i} é"
        msg["Date"] = format_datetime(
            start.replace(microsecond=0) + __import__("datetime").timedelta(seconds=i + 1)
        )
        msg["Message-ID"] = make_msgid(domain="bench.test")
        msg.set_content(text, cte="quoted-printable")
        msg.add_alternative(
            f"<html><body><p>{text.replace(chr(10), '<br>')}</p></body></html>",
            subtype="html",
            cte="quoted-printable",
        )
        if i % 10 == 0:
            msg.add_attachment(
                rng.randbytes(8_000), maintype="application", subtype="pdf", filename=f"doc{i}.pdf"
            )
        messages.append(msg.as_bytes())
    return messages


def bare_parse_rate(messages: list[bytes]) -> float:
    parser = BytesParser(policy=compat32)
    started = time.perf_counter()
    for raw in messages:
        parser.parsebytes(raw)
    return len(messages) / (time.perf_counter() - started)


async def pipeline_rate(
    database_url: str, redis_url: str, messages_for: int
) -> tuple[float, list[bytes]]:
    await asyncio.to_thread(migrations.upgrade, database_url)
    settings = Settings(
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        secret_key="b" * 40,
        _env_file=None,
    )  # type: ignore[call-arg]
    runtime = await Runtime.create(settings, jobs=JobQueue)
    try:
        async with runtime.db.transaction() as session:
            workspace, owner = await workspaces_service.create_workspace(
                session, "Bench", f"bench-{uuid.uuid4().hex[:6]}@crm.test"
            )
            from backend.auth.service import Viewer
            from backend.contacts import service as contacts_service

            contacts = [f"client{i}@bench-client.test" for i in range(50)]
            for address in contacts:
                await contacts_service.create_contact(
                    session, Viewer(owner, workspace), email=address
                )
            mailbox = await mailboxes_service.connect_mailbox(
                session,
                AfterCommit(),
                settings.secret,
                owner=owner,
                provider=Provider.GMAIL,
                email_address=owner.email,
                credentials={},
            )
            mailbox.connected_at = mailbox.connected_at.replace(year=2000)
        messages = make_messages(messages_for, owner.email, contacts)
        with fake_provider() as store:
            for raw in messages:
                store.deliver(mailbox.email_address, raw)
            started = time.perf_counter()
            result = await run_pass(runtime, mailbox.id)
            elapsed = time.perf_counter() - started
        assert result is not None and result.filed == len(messages), result
        return len(messages) / elapsed, messages
    finally:
        await runtime.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "MAILSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()

    name = f"mailsync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = args.postgres_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        pg_rate, messages = await pipeline_rate(f"{base}/{name}", args.redis_url, args.count)
        with tempfile.TemporaryDirectory() as tmp:
            sqlite_rate, _ = await pipeline_rate(
                f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}", args.redis_url, args.count
            )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    parse_rate = bare_parse_rate(messages)
    size = sum(len(m) for m in messages) / len(messages) / 1024
    print(f"messages: {len(messages)} (average {size:.1f} KB)")
    print(f"bare compat32 parse:     {parse_rate:8.1f} msg/s")
    print(
        f"pipeline -> PostgreSQL:  {pg_rate:8.1f} msg/s  ({pg_rate / parse_rate:.2f} of bare parse)"
    )
    print(
        f"pipeline -> SQLite:      {sqlite_rate:8.1f} msg/s  ({sqlite_rate / parse_rate:.2f} of bare parse)"
    )


if __name__ == "__main__":
    asyncio.run(main())
