"""Benchmark: messages per second through the whole sync pipeline, PostgreSQL and SQLite.

    uv run python -m tests.bench.ingest [--count 1000] [--rounds 3] [--postgres-url ...]

Files N realistic messages (5-50 KB, multipart/alternative with quoted-printable text and
HTML, one in ten with an attachment) through a real sync pass (provider double, parse,
rules, storage, cursor) and prints the rate. The baseline, bare
`BytesParser(policy=compat32).parsebytes` over the same bytes, is measured interleaved with
the pipeline (before each round and after the last), so a change in the machine's load moves
both. Prints min/median/max of each and last `ingest ratio: <number>`: the pipeline's median
rate over the bare parse's median, the lower of the two databases.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
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
from backend.sync.parsing import parse_many
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
    database_url: str, redis_url: str, messages_for: int, parse_processes: int = 1
) -> tuple[float, list[bytes]]:
    await asyncio.to_thread(migrations.upgrade, database_url)
    settings = Settings(
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        secret_key="b" * 40,
        parse_processes=parse_processes,
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
        # A worker's parse processes outlive its passes: start them before the clock does.
        await parse_many(messages[:1], parse_processes)
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


def summary(values: list[float]) -> str:
    return (
        f"min {min(values):8.1f}  median {statistics.median(values):8.1f}  max {max(values):8.1f}"
    )


async def interleaved(
    database_url: str, redis_url: str, count: int, rounds: int, parse_processes: int
) -> tuple[list[float], list[float], list[bytes]]:
    """Pipeline rates and bare parse rates, the parse measured around every round."""
    pipeline: list[float] = []
    bare: list[float] = []
    messages: list[bytes] = []
    for _ in range(rounds):
        rate, messages = await pipeline_rate(database_url, redis_url, count, parse_processes)
        # The bare parse right after the round, over the very bytes the round filed.
        bare.append(bare_parse_rate(messages))
        pipeline.append(rate)
    return pipeline, bare, messages


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--parse-processes", type=int, default=1, help="MAILSYNC_PARSE_PROCESSES (0: a thread)"
    )
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
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        pg, pg_bare, messages = await interleaved(
            f"{base}/{name}", args.redis_url, args.count, args.rounds, args.parse_processes
        )
        results["PostgreSQL"] = (pg, pg_bare)
        with tempfile.TemporaryDirectory() as tmp:
            lite, lite_bare, _ = await interleaved(
                f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}",
                args.redis_url,
                args.count,
                args.rounds,
                args.parse_processes,
            )
        results["SQLite"] = (lite, lite_bare)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    size = sum(len(m) for m in messages) / len(messages) / 1024
    print(
        f"messages: {len(messages)} per round (average {size:.1f} KB), {args.rounds} rounds, "
        f"parse processes: {args.parse_processes}"
    )
    ratios = []
    for db, (pipeline, bare) in results.items():
        ratio = statistics.median(pipeline) / statistics.median(bare)
        ratios.append(ratio)
        print(f"bare compat32 parse ({db} rounds): {summary(bare)} msg/s")
        print(f"pipeline -> {db:10}            {summary(pipeline)} msg/s  ({ratio:.2f} of bare)")
    print(f"ingest ratio: {min(ratios):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
