"""Chaos for sync (issue 13): mail into Gmail and Outlook sandbox mailboxes while the provider
fails and slows down, workers are SIGKILLed mid-pass and Redis restarts empty; then count what
was lost, stored twice, filed on the wrong timelines, and announced other than once.

Shared by `tests/test_chaos.py` (a few hundred messages) and `tests/bench/soak.py` (as many as
asked). Everything runs for real and on its own: a private redis-server, the sandbox on a
free port (in this process, so faults are set directly), an API process whose websocket a
subscriber counts `emailReceived` on, and worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import sqlalchemy as sa
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlmodel import col, select

from backend.auth.service import Viewer, issue_token
from backend.auth.tables import Role
from backend.contacts import service as contacts_service
from backend.db import Database
from backend.exclusions import service as exclusions_service
from backend.graphql.relay import parse_global_id, to_global_id
from backend.kit.clock import now
from backend.mail.tables import Email, TimelineEntry
from backend.mailboxes.tables import Mailbox
from backend.sandbox.faults import Fault
from backend.sandbox.google import GoogleSandbox
from backend.settings import Settings
from backend.sync.queue import SYNC_PREFIX
from backend.workspaces import service as workspace_service
from tests.client import subscribe
from tests.redis_server import RedisServer, free_port
from tests.sandbox import SandboxServer
from tests.worker import worker_process

SECRET = "chaos-secret-key-that-is-long-enough-0123456789"
EMAIL_RECEIVED = "subscription { emailReceived { email { id messageId } contacts { id } } }"
CONNECT = """
mutation($input: ConnectMailboxInput!) {
  connectMailbox(input: $input) { authorizationUrl userErrors { code message } }
}"""
EXCLUDED_DOMAIN = "excluded.chaos.test"
# A pass stops itself after this; a killed worker's pass is retried this + 15 s after it began.
PASS_TIMEOUT = 20


@dataclass
class Planned:
    """One message: where it is delivered and the contacts it must be filed on (none: it
    must not be stored, R1/R4/R5)."""

    message_id: str
    raw: bytes
    gmail: bool
    outlook: bool
    contacts: frozenset[str]  # contact addresses (their main address)


@dataclass
class Report:
    messages: int = 0
    to_file: int = 0
    filed: int = 0
    lost: int = 0
    duplicated: int = 0
    misfiled: int = 0
    announced_once: int = 0
    unannounced: int = 0
    announced_twice: int = 0
    announced_unfiled: int = 0
    killed_workers: int = 0
    redis_restarts: int = 0
    details: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.counts().items())


def _message(message_id: str, sender: str, to: list[str], cc: list[str], subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(now() + timedelta(seconds=1))
    msg.set_content(f"{subject}\n\nChaos traffic.")
    return msg.as_bytes()


@dataclass
class Cast:
    run: str
    gmail: str  # the owner's login and Gmail address
    outlook: str  # a seller's login and Outlook address
    contacts: list[str]  # main addresses
    alternate: str  # an additional address of contacts[-1]

    @classmethod
    def new(cls) -> Cast:
        run = uuid.uuid4().hex[:8]
        return cls(
            run=run,
            gmail=f"owner-{run}@gmail.chaos.test",
            outlook=f"seller-{run}@outlook.chaos.test",
            contacts=[f"contact{i}-{run}@client{i}.chaos.test" for i in range(6)],
            alternate=f"other-{run}@client5.chaos.test",
        )


def plan(cast: Cast, count: int, seed: int = 13) -> list[Planned]:
    """A deterministic mix: contact mail to either mailbox or both, with Cc, through an
    additional address, and mail that must not be filed (a stranger, an excluded sender, a
    colleague)."""
    rng = random.Random(seed)
    kinds = ["one"] * 8 + ["cc"] * 3 + ["alias", "both", "both", "stranger", "excluded", "internal"]
    out: list[Planned] = []
    for n in range(count):
        kind = rng.choice(kinds)
        message_id = f"<chaos-{n}-{cast.run}@chaos.test>"
        first, second = rng.sample(cast.contacts, 2)
        user = rng.choice([cast.gmail, cast.outlook])
        subject = f"Chaos {n} {kind}"
        cc: list[str] = []
        to = [user]
        sender = first
        expected = frozenset([first])
        if kind == "cc":
            cc = [second]
            expected = frozenset([first, second])
        elif kind == "alias":
            sender = cast.alternate
            expected = frozenset([cast.contacts[-1]])
        elif kind == "both":
            to = [cast.gmail, cast.outlook]
        elif kind == "stranger":
            sender = f"stranger{n}@nowhere.chaos.test"
            expected = frozenset()
        elif kind == "excluded":  # R4: an excluded From files nothing, contacts in Cc or not
            sender = f"news{n}@{EXCLUDED_DOMAIN}"
            cc = [first]
            expected = frozenset()
        elif kind == "internal":  # R1: mail among users is never filed
            sender, to, user = cast.outlook, [cast.gmail], cast.gmail
            expected = frozenset()
        raw = _message(message_id, sender, to, cc, subject)
        out.append(
            Planned(
                message_id,
                raw,
                gmail=cast.gmail in to,
                outlook=cast.outlook in to,
                contacts=expected,
            )
        )
    return out


async def _any_hit(faults: list[Fault]) -> bool:
    return any(fault.hits for fault in faults)


async def wait_for(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll a condition with a generous deadline (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def api_process(env: dict[str, str], port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:

            async def ready() -> bool:
                assert proc.poll() is None, "the API process exited"
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get(f"http://127.0.0.1:{port}/healthz")).is_success
                return False

            await wait_for(ready, 90, "the API process starting")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Chaos:
    """The running stack and the traffic; `run()` returns the counts."""

    def __init__(self, database_url: str, workdir: Path, *, workers: int = 3) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.worker_count = workers
        self.cast = Cast.new()
        self.redis = RedisServer(workdir)
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.sandbox = SandboxServer(GoogleSandbox(push_min_interval=0.2), free_port())
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.tokens: dict[str, str] = {}
        self.contact_ids: dict[str, uuid.UUID] = {}
        self.workspace_id: uuid.UUID | None = None
        self.announced: Counter[str] = Counter()  # email global id -> emailReceived events
        self.announced_contacts: dict[str, set[str]] = {}
        self.report = Report()
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stack = ExitStack()
        self._started = 0.0

    def say(self, what: str) -> None:
        """Progress on stdout (pytest shows it for a failing test): where the time went."""
        elapsed = asyncio.get_running_loop().time() - self._started
        print(f"[chaos {elapsed:6.1f} s] {what}", flush=True)

    # ------------------------------------------------------------------ the stack
    def _environment(self) -> dict[str, str]:
        return {
            "MAILSYNC_ENV": "test",
            "MAILSYNC_SECRET_KEY": SECRET,
            "MAILSYNC_LOG_LEVEL": "WARNING",
            "MAILSYNC_DATABASE_URL": self.database_url,
            "MAILSYNC_REDIS_URL": self.redis.url,
            "MAILSYNC_PUBLIC_URL": self.api,
            "MAILSYNC_GOOGLE_BASE_URL": self.sandbox.url,
            "MAILSYNC_MICROSOFT_BASE_URL": self.sandbox.url,
            "MAILSYNC_SYNC_SPREAD_SECONDS": "0",
        }

    def start_worker(self) -> None:
        self._workers.append(self._stack.enter_context(worker_process(PASS_TIMEOUT, self.env)))

    def kill_workers(self) -> None:
        """SIGKILL every worker (whatever pass each is in) and start as many new ones."""
        for proc in self._workers:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            self.report.killed_workers += 1
        self._workers = []
        for _ in range(self.worker_count):
            self.start_worker()

    async def _seed(self) -> None:
        assert self.settings is not None
        db = Database(self.database_url)
        try:
            async with db.transaction() as session:
                workspace, owner = await workspace_service.create_workspace(
                    session, f"Chaos {self.cast.run}", self.cast.gmail, "Olivia Owner"
                )
                seller = await workspace_service.add_user(
                    session, workspace, self.cast.outlook, Role.USER, "Sam Seller"
                )
                viewer = Viewer(user=owner, workspace=workspace)
                for n, address in enumerate(self.cast.contacts):
                    extra = [self.cast.alternate] if address == self.cast.contacts[-1] else []
                    contact = await contacts_service.create_contact(
                        session, viewer, email=address, name=f"Contact {n}", additional_emails=extra
                    )
                    self.contact_ids[address] = contact.id
                await exclusions_service.add_exclusion(session, viewer, EXCLUDED_DOMAIN)
                for user in (owner, seller):
                    self.tokens[user.email] = await issue_token(
                        session, self.settings.secret, user, timedelta(hours=6)
                    )
                self.workspace_id = workspace.id
        finally:
            await db.dispose()

    async def _connect(self, address: str, provider: str) -> uuid.UUID:
        """What a user does: connectMailbox, consent at the provider, back to mailsync."""
        async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
            answer = await http.post(
                f"{self.api}/graphql",
                json={
                    "query": CONNECT,
                    "variables": {"input": {"provider": provider, "loginHint": address}},
                },
                headers={"Authorization": f"Bearer {self.tokens[address]}"},
            )
            payload = answer.json()["data"]["connectMailbox"]
            assert payload["authorizationUrl"], payload
            consent = await http.get(payload["authorizationUrl"])
            callback = await http.get(consent.headers["location"])
            landed = parse_qs(urlsplit(callback.headers["location"]).query)
        assert "mailboxId" in landed, landed
        parsed = parse_global_id(landed["mailboxId"][0])
        assert parsed is not None
        return parsed[1]

    async def _synced_once(self, mailbox_ids: list[uuid.UUID]) -> bool:
        db = Database(self.database_url)
        try:
            async with db.sessionmaker() as session:
                synced = await session.scalar(
                    select(sa.func.count())
                    .select_from(Mailbox)
                    .where(
                        col(Mailbox.id).in_(mailbox_ids),
                        col(Mailbox.last_synced_at).is_not(None),
                    )
                )
            return bool(synced == len(mailbox_ids))
        finally:
            await db.dispose()

    # ------------------------------------------------------------------ announcements
    async def _count_announcements(self, ready: asyncio.Event) -> None:
        async def hub_subscribers() -> int:
            async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                return int((await http.get(f"{self.api}/readyz")).json()["subscribers"])

        ws = self.api.replace("http://", "ws://") + "/graphql"
        async with subscribe(
            ws, self.tokens[self.cast.gmail], EMAIL_RECEIVED, subscribers=hub_subscribers
        ) as sub:
            ready.set()
            while True:
                payload = await sub.next(timeout=3600)
                event = payload["data"]["emailReceived"]
                email_id = event["email"]["id"]
                self.announced[email_id] += 1
                self.announced_contacts[email_id] = {c["id"] for c in event["contacts"]}

    # ------------------------------------------------------------------ chaos
    def _deliver(self, message: Planned) -> None:
        if message.gmail:
            self.sandbox.google.deliver(self.cast.gmail, message.raw)
        if message.outlook:
            self.sandbox.microsoft.deliver(self.cast.outlook, message.raw)

    def _hang(self, account: str, path: str) -> Fault:
        """The next pass of `account` hangs inside the provider at `path` (until killed)."""
        return self.sandbox.google.faults.add(
            Fault(delay_seconds=600, account=account, path=path, times=1)
        )

    def _kill_if_hanging(self, hangs: list[Fault]) -> list[Fault]:
        """SIGKILL every worker once a pass hangs: that pass, and any other running, dies
        mid-way. Returns the hangs still waiting for a pass."""
        hit = [hang for hang in hangs if hang.hits >= 1]
        if hit:
            self.kill_workers()
            where = ", ".join(f"{hang.account} at {hang.path}" for hang in hit)
            self.say(f"killed every worker while a pass hung ({where})")
        return [hang for hang in hangs if hang.hits < 1]

    async def _restart_redis(self, during: list[Planned]) -> None:
        """Redis goes away (its queue, flags and in-progress keys with it) in the middle of an
        Outlook pass, while it fetches a message, so the pass commits while Redis is down;
        mail keeps arriving; Redis comes back empty on the same port."""
        slow = self.sandbox.google.faults.add(
            Fault(delay_seconds=3, account=self.cast.outlook, path=r"/\$value$", times=1)
        )
        # Mail for an Outlook contact, new to the workspace, starts the pass (the plan holds
        # some in every stretch).
        first = [m for m in during if m.outlook and not m.gmail and m.contacts][:1]
        assert first, "no mail for an Outlook contact around the restart"
        # Counted before: on SQLite a read waits for the pass's transaction to end.
        before = await self._stored_count()
        for message in first:
            self._deliver(message)
        await wait_for(functools.partial(_any_hit, [slow]), 60, "an Outlook pass fetching")
        await self.redis.stop()
        for message in during:
            if message not in first:
                self._deliver(message)

        async def committed() -> bool:
            return await self._stored_count() > before

        with contextlib.suppress(AssertionError):  # counted below whether it does or not
            await wait_for(committed, 30, "the pass committing while Redis is down")
        await self.redis.start()
        self.report.redis_restarts += 1
        self.say(
            f"Redis restarted; {await self._stored_count() - before} emails were stored since "
            f"the pass began and {len(during)} messages arrived while it was down"
        )

    def _faults(self) -> None:
        """Transient provider trouble on fetching messages: rate limits with Retry-After,
        slow answers, and a server error per provider (waited out inside the pass, or a failed
        pass: R13's error entry and backoff, then the scheduler's retry). They leave the calls
        a pass starts with (history, delta) to the hangs."""
        faults = self.sandbox.google.faults
        for account, path in ((self.cast.gmail, "/messages"), (self.cast.outlook, "/me/messages/")):
            faults.add(Fault(status=429, retry_after=1, account=account, path=path, times=3))
            faults.add(Fault(delay_seconds=1.5, account=account, path=path, times=2))
            faults.add(Fault(status=503, account=account, path=path, times=1))

    async def _traffic(self, messages: list[Planned], rate: float) -> None:
        """Deliver at about `rate` messages a second, with the chaos at fixed points: a Gmail
        pass hung and every worker killed from a fifth of the way, Redis restarted at 35 %,
        provider faults from 45 %, an Outlook pass hung and every worker killed from 65 %.
        Mail keeps arriving meanwhile; its pushes start the passes that hang, so while a hang
        waits for its pass the last messages are held back and go out one by one."""
        total = len(messages)
        marks = {
            total // 5: "hang-gmail",
            total * 7 // 20: "redis",
            total * 9 // 20: "faults",
            total * 13 // 20: "hang-outlook",
        }
        batch = 5
        hangs: list[Fault] = []
        n = 0
        while n < total or hangs:
            hangs = self._kill_if_hanging(hangs)
            step = marks.pop(n, None)
            if step == "faults":
                self._faults()
                self.say("provider faults on")
            elif step == "hang-gmail":
                hangs.append(self._hang(self.cast.gmail, "/history"))
            elif step == "hang-outlook":
                hangs.append(self._hang(self.cast.outlook, "/delta"))
            elif step == "redis":
                during = messages[n : n + batch * 2]
                await self._restart_redis(during)
                n += len(during)
                continue
            if n >= total:  # a hang may still wait, and nothing is left to push a pass
                if not hangs:
                    break
                await wait_for(
                    functools.partial(_any_hit, list(hangs)),
                    120,
                    f"a pass reaching {[h.path for h in hangs]}",
                )
                continue
            size = 1 if hangs and total - n <= total // 10 else batch
            upto = min([n + size, total, *[m for m in marks if m > n]])
            for message in messages[n:upto]:
                self._deliver(message)
            n = upto
            await asyncio.sleep(size / rate)  # pacing the traffic, not waiting for the product

    # ------------------------------------------------------------------ counting
    async def _stored(self) -> tuple[dict[str, list[uuid.UUID]], dict[uuid.UUID, set[uuid.UUID]]]:
        assert self.workspace_id is not None
        db = Database(self.database_url)
        try:
            async with db.sessionmaker() as session:
                emails: dict[str, list[uuid.UUID]] = {}
                for email_id, message_id in await session.execute(
                    select(Email.id, Email.message_id).where(
                        Email.workspace_id == self.workspace_id
                    )
                ):
                    emails.setdefault(message_id, []).append(email_id)
                filed: dict[uuid.UUID, set[uuid.UUID]] = {}
                for email_id, contact_id in await session.execute(
                    select(TimelineEntry.email_id, TimelineEntry.contact_id)
                    .join(Email, col(Email.id) == TimelineEntry.email_id)
                    .where(Email.workspace_id == self.workspace_id)
                ):
                    filed.setdefault(email_id, set()).add(contact_id)
            return emails, filed
        finally:
            await db.dispose()

    async def _all_filed(self, messages: list[Planned]) -> bool:
        emails, _ = await self._stored()
        return all(m.message_id in emails for m in messages if m.contacts)

    async def _stored_count(self) -> int:
        emails, _ = await self._stored()
        return sum(len(ids) for ids in emails.values())

    async def _idle(self) -> bool:
        """No pass queued or running (the scheduler's cron keys do not count)."""
        client = Redis.from_url(self.redis.url)
        try:
            queued = await client.zrange("arq:queue", 0, -1)
            if any(job.startswith(SYNC_PREFIX.encode()) for job in queued):
                return False
            running = client.scan_iter(in_progress_key_prefix + SYNC_PREFIX + "*")
            return not [key async for key in running]
        except RedisError:
            return False
        finally:
            await client.aclose()

    async def _count(self, messages: list[Planned]) -> None:
        emails, filed = await self._stored()
        report = self.report
        report.messages = len(messages)
        planned_ids = {m.message_id for m in messages}
        for message in messages:
            stored = emails.get(message.message_id, [])
            want = {self.contact_ids[a] for a in message.contacts}
            if message.contacts:
                report.to_file += 1
            if len(stored) > 1:
                report.duplicated += 1
                report.details.append(f"stored {len(stored)} times: {message.message_id}")
            if not stored:
                if message.contacts:
                    report.lost += 1
                    report.details.append(f"lost: {message.message_id}")
                continue
            got = filed.get(stored[0], set())
            if got != want:
                report.misfiled += 1
                report.details.append(f"misfiled {message.message_id}: {got} != {want}")
            if message.contacts:
                report.filed += 1
            announced = self.announced.get(to_global_id("Email", stored[0]), 0)
            if announced == 1:
                report.announced_once += 1
            elif announced == 0:
                if got:
                    report.unannounced += 1
                    report.details.append(f"never announced: {message.message_id}")
            else:
                report.announced_twice += 1
                report.details.append(f"announced {announced} times: {message.message_id}")
        stray = [mid for mid in emails if mid not in planned_ids]
        report.misfiled += len(stray)
        report.details.extend(f"stored but never sent: {mid}" for mid in stray)
        known = {e for ids in emails.values() for e in ids}
        known_ids = {to_global_id("Email", e) for e in known}
        report.announced_unfiled = sum(1 for e in self.announced if e not in known_ids)

    # ------------------------------------------------------------------ the run
    async def run(self, count: int, rate: float = 10.0, settle_seconds: float = 300) -> Report:
        self._started = asyncio.get_running_loop().time()
        await self.redis.start()
        await self.sandbox.start()
        self.env = {**os.environ, **self._environment()}
        self.settings = Settings.model_validate(
            {k.removeprefix("MAILSYNC_").lower(): v for k, v in self._environment().items()}
        )
        self.sandbox.google.push_endpoints["*"] = (
            f"{self.api}/webhooks/google?token={self.settings.push_token}"
        )
        self.sandbox.google.ensure_account(self.cast.gmail)
        self.sandbox.microsoft.ensure_account(self.cast.outlook)
        await self._seed()
        counter: asyncio.Task[None] | None = None
        try:
            for _ in range(self.worker_count):
                self.start_worker()  # they start up while the API does
            async with api_process(self.env, self.api_port):
                self.say("API up")
                mailboxes = [
                    await self._connect(self.cast.gmail, "GMAIL"),
                    await self._connect(self.cast.outlook, "MICROSOFT"),
                ]
                await wait_for(
                    lambda: self._synced_once(mailboxes), 120, "the first pass of each mailbox"
                )
                self.say("both mailboxes connected and synced once")
                ready = asyncio.Event()
                counter = asyncio.create_task(self._count_announcements(ready))
                await asyncio.wait_for(ready.wait(), 60)
                messages = plan(self.cast, count)
                self.say(f"delivering {count} messages")
                await self._traffic(messages, rate)
                self.say("all delivered")
                # The last chaos is over: clear the faults (a hang still pending is harmless:
                # its worker is dead) and wait until everything is filed and the queue is
                # empty; the scheduler and the pushes of the last messages must get there.
                self.sandbox.google.faults.clear()

                async def settled() -> bool:
                    assert counter is not None and not counter.done(), counter
                    return await self._all_filed(messages) and await self._idle()

                with contextlib.suppress(AssertionError):
                    await wait_for(settled, settle_seconds, "everything filed")
                self.say("settled" if await settled() else "NOT settled")
                filed_count = sum(1 for m in messages if m.contacts)

                async def announced() -> bool:
                    return sum(self.announced.values()) >= filed_count

                # Events trail the commit by a moment; missing ones are counted, not waited for.
                with contextlib.suppress(AssertionError):
                    await wait_for(announced, 30, "every filed email announced")
                await self._count(messages)
                self.say(self.report.summary())
        finally:
            if counter is not None:
                counter.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await counter
            self._stack.close()
            await self.sandbox.stop()
            await self.redis.stop()
        return self.report


async def run_chaos(
    database_url: str | None, count: int, rate: float, settle_seconds: float = 300
) -> Report:
    """A run on `database_url`, or on a fresh SQLite database migrated here."""
    with tempfile.TemporaryDirectory(prefix="mailsync-chaos-") as tmp:
        workdir = Path(tmp)
        if database_url is None:
            from backend import migrations

            database_url = f"sqlite+aiosqlite:///{workdir / 'chaos.db'}"
            await asyncio.to_thread(migrations.upgrade, database_url)
        return await Chaos(database_url, workdir).run(count, rate, settle_seconds)


def result_line(report: Report) -> str:
    return "chaos result: " + json.dumps(report.counts(), sort_keys=True)
