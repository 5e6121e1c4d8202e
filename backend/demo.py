"""`mailsync demo`: one command from a fresh checkout to a live API with a seeded workspace.

It runs on a fresh SQLite database, uses the Redis at MAILSYNC_REDIS_URL when one answers
and otherwise starts a private `redis-server`, starts the Google sandbox, the API, a
worker and the capture address's SMTP receiver, seeds a workspace, connects each user's Gmail through the real OAuth flow against
the sandbox (Max's mailbox is Outlook, through the Microsoft identity platform), prints the
GraphiQL link and then generates mail traffic, some of it crossing between Gmail and Outlook,
until interrupted. When Dovecot and Postfix are installed (`scripts/demo` installs them) it
also starts them and Ines connects her mailbox by IMAP/SMTP; its traffic goes through them.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import os
import random
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import httpx
from redis import Redis
from redis.exceptions import RedisError

from backend import migrations
from backend.auth.service import Viewer, issue_token
from backend.auth.tables import Role
from backend.contacts import service as contacts_service
from backend.db import Database
from backend.exclusions import service as exclusions_service
from backend.sandbox import mailserver
from backend.sandbox.mailserver import MailServer
from backend.settings import Settings
from backend.workspaces import service as workspace_service

DEMO_WORKSPACE = "Demo Co"
OWNER_EMAIL = "olivia@demo.mailsync.test"
OUTLOOK_EMAIL = "max@demo.mailsync.test"
# Connected by IMAP/SMTP to a real Dovecot and Postfix started by the demo, when installed.
IMAP_EMAIL = "ines@demo.mailsync.test"
IMAP_PASSWORD = "ines-app-password"  # noqa: S105 (the demo mail server's account)
TEAM = [
    ("sam@demo.mailsync.test", Role.USER, "Sam Seller"),
    (OUTLOOK_EMAIL, Role.USER, "Max Manager"),
]
CONTACTS = [
    ("Ada Lovelace", "ada@analytical.example"),
    ("Grace Hopper", "grace@cobol.example"),
    ("Alan Turing", "alan@bletchley.example"),
    ("Katherine Johnson", "katherine@orbit.example"),
]
EXCLUDED_DOMAIN = "newsletters.example"
SUBJECTS = [
    "Quote for 40 seats",
    "Contract redlines",
    "Can we move our call?",
    "Invoice question",
    "Intro: our CTO",
    "Renewal in March",
]
SEND = """
mutation($input: SendEmailInput!) {
  sendEmail(input: $input) { email { messageId } userErrors { code message } }
}"""
MAILBOXES = "{ viewer { user { mailboxes { id } } } }"
CONNECT = """
mutation($provider: Provider!, $hint: String) {
  connectMailbox(input: {provider: $provider, loginHint: $hint}) {
    authorizationUrl userErrors { code message }
  }
}"""


def provider_of(address: str) -> str:
    if address == IMAP_EMAIL:
        return "IMAP"
    return "MICROSOFT" if address == OUTLOOK_EMAIL else "GMAIL"


CONNECT_IMAP = """
mutation($input: ConnectImapMailboxInput!) {
  connectImapMailbox(input: $input) { mailbox { id } userErrors { code message } }
}"""


def connect_imap_mailbox(api: str, token: str, address: str, mail: MailServer) -> None:
    """What a user does in the app for a mailbox without OAuth: its servers and password."""
    given = {
        "emailAddress": address,
        "password": IMAP_PASSWORD,
        "imapHost": "127.0.0.1",
        "imapPort": mail.ports.imaps,
        "smtpHost": "127.0.0.1",
        "smtpPort": mail.ports.submissions,
        "security": "TLS",
    }
    with httpx.Client(trust_env=False, timeout=60) as http:
        answer = http.post(
            f"{api}/graphql",
            json={"query": CONNECT_IMAP, "variables": {"input": given}},
            headers={"Authorization": f"Bearer {token}"},
        ).json()
    connected = answer["data"]["connectImapMailbox"]
    if connected["mailbox"] is None:
        raise SystemExit(f"connecting {address} failed: {connected['userErrors']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def ensure_redis(url: str, workdir: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The configured Redis if it answers, else a private redis-server for this demo."""
    if _redis_answers(url):
        return url, None
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            f"No Redis answers at {url} and no redis-server is installed.\n"
            "Install one (Debian: apt-get install redis-server) or set MAILSYNC_REDIS_URL."
        )
    port = _free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(  # noqa: S603 (our own fixed arguments)
        [binary, *args, "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    private = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _redis_answers(private):
            return private, proc
        time.sleep(0.05)
    proc.terminate()
    raise SystemExit("redis-server did not start")


async def seed(settings: Settings, imap: bool = False) -> tuple[dict[str, str], str]:
    """Create the demo workspace; return an API token per user and its capture address."""
    db = Database(settings.database_url)
    try:
        async with db.transaction() as session:
            workspace, owner = await workspace_service.create_workspace(
                session, DEMO_WORKSPACE, OWNER_EMAIL, "Olivia Owner"
            )
            users = [owner]
            team = [*TEAM, (IMAP_EMAIL, Role.USER, "Ines Imap")] if imap else TEAM
            for address, role, name in team:
                users.append(
                    await workspace_service.add_user(session, workspace, address, role, name)
                )
            viewer = Viewer(user=owner, workspace=workspace)
            for name, address in CONTACTS:
                await contacts_service.create_contact(session, viewer, email=address, name=name)
            await exclusions_service.add_exclusion(session, viewer, EXCLUDED_DOMAIN)
            tokens = {
                user.email: await issue_token(session, settings.secret, user, timedelta(days=7))
                for user in users
            }
            return tokens, workspace_service.capture_address(workspace, settings.capture_domain)
    finally:
        await db.dispose()


def _wait_for(url: str, children: list[subprocess.Popen[bytes]], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("a demo process exited during start-up (see its output above)")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def _wait_for_port(port: int, children: list[subprocess.Popen[bytes]], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise SystemExit("a demo process exited during start-up")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def connect_mailbox(api: str, token: str, address: str) -> str:
    """What a user does in the app: connectMailbox, consent at Google or Microsoft, back to
    mailsync."""
    with httpx.Client(trust_env=False, timeout=30) as http:
        answer = http.post(
            f"{api}/graphql",
            json={
                "query": CONNECT,
                "variables": {"provider": provider_of(address), "hint": address},
            },
            headers={"Authorization": f"Bearer {token}"},
        ).json()
        connect = answer["data"]["connectMailbox"]
        if connect["authorizationUrl"] is None:
            raise SystemExit(f"connecting {address} failed: {connect['userErrors']}")
        url = connect["authorizationUrl"]
        consent = http.get(url)
        landed = http.get(consent.headers["location"])
        return str(landed.headers.get("location", ""))


@dataclass
class Stack:
    """A running demo: the API, a worker and the sandbox, seeded and connected."""

    api: str
    sandbox: str
    database_url: str
    redis_url: str
    tokens: dict[str, str]  # API token per user address
    children: list[subprocess.Popen[bytes]]
    capture_port: int = 0  # the SMTP receiver of capture addresses (R16)
    capture_address: str = ""
    mail: MailServer | None = None  # Dovecot and Postfix, when installed

    def alive(self) -> bool:
        return all(child.poll() is None for child in self.children)


@contextmanager
def running_stack(
    settings: Settings, host: str, port: int, *, quiet: bool = False
) -> Iterator[Stack]:
    """Start sandbox, worker and API on a fresh database, seed the workspace and connect
    each user's mailbox (Gmail, Max's Outlook) through OAuth; stop everything on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="mailsync-demo-"))
    redis_url, redis_proc = ensure_redis(settings.redis_url, workdir)
    # The sandbox keeps its mailboxes in memory, so the demo starts from a fresh database.
    database_url = os.environ.get(
        "MAILSYNC_DATABASE_URL", f"sqlite+aiosqlite:///{workdir / 'demo.db'}"
    )
    sandbox_port = _free_port()
    capture_port = _free_port()
    api = f"http://{host}:{port}"
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    env = {
        **os.environ,
        "MAILSYNC_REDIS_URL": redis_url,
        "MAILSYNC_DATABASE_URL": database_url,
        "MAILSYNC_PUBLIC_URL": api,
        "MAILSYNC_GOOGLE_BASE_URL": sandbox,
        "MAILSYNC_MICROSOFT_BASE_URL": sandbox,
    }
    mail = MailServer() if mailserver.available() else None
    if mail is not None:
        # Its certificate comes from a private CA, as a company mail server's would.
        env["MAILSYNC_IMAP_CA_FILE"] = str(mail.cert)
    settings = Settings(
        **{**settings.model_dump(), "database_url": database_url, "public_url": api}
    )
    children: list[subprocess.Popen[bytes]] = []
    output = subprocess.DEVNULL if quiet else None
    try:
        if mail is not None:
            mail.start()
            mail.add_user(IMAP_EMAIL, IMAP_PASSWORD)
        migrations.upgrade(database_url)
        tokens, capture_address = asyncio.run(seed(settings, imap=mail is not None))
        push = f"{api}/webhooks/google?token={settings.push_token}"
        cli = [sys.executable, "-m", "backend.cli"]
        for command in (
            ["sandbox", "--port", str(sandbox_port), "--push-endpoint", push],
            ["worker"],
            ["serve", "--host", host, "--port", str(port)],
            ["capture", "--port", str(capture_port)],
        ):
            children.append(
                subprocess.Popen([*cli, *command], env=env, stdout=output, stderr=output)  # noqa: S603
            )
        _wait_for(f"{sandbox}/_sandbox/health", children)
        _wait_for(f"{api}/healthz", children)
        _wait_for_port(capture_port, children)
        for address, token in tokens.items():
            if provider_of(address) == "IMAP" and mail is not None:
                connect_imap_mailbox(api, token, address, mail)
            else:
                connect_mailbox(api, token, address)
        yield Stack(
            api,
            sandbox,
            database_url,
            redis_url,
            tokens,
            children,
            capture_port,
            capture_address,
            mail,
        )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(5)
        if mail is not None:
            mail.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def run(settings: Settings, host: str, port: int) -> None:
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with running_stack(settings, host, port) as stack:
        owner_token = stack.tokens[OWNER_EMAIL]
        print(
            f"\nmailsync demo is running on {stack.api}\n"
            f"  GraphiQL (signed in as {OWNER_EMAIL}): run the `Live` subscription and watch\n"
            f"  mail arrive every few seconds:\n    {stack.api}/graphql?token={owner_token}\n"
            f"  Bearer token:\n    {owner_token}\n"
            f"  Mailboxes: {', '.join(f'{a} ({provider_of(a).title()})' for a in stack.tokens)}\n"
            f"  Capture address (Bcc it; SMTP on 127.0.0.1:{stack.capture_port}): "
            f"{stack.capture_address}\n"
            + (
                f"  IMAP/SMTP (Dovecot, Postfix): imaps 127.0.0.1:{stack.mail.ports.imaps}, "
                f"submissions 127.0.0.1:{stack.mail.ports.submissions}, "
                f"{IMAP_EMAIL} / {IMAP_PASSWORD}\n"
                if stack.mail
                else ""
            )
            + f"  Gmail and Outlook sandbox: {stack.sandbox}   Database: {stack.database_url}"
            f"   Redis: {stack.redis_url}\n"
            "Press Ctrl+C to stop.\n",
            flush=True,
        )
        traffic = Traffic(
            stack.sandbox,
            list(stack.tokens),
            settings_interval(),
            stack.api,
            stack.tokens,
            capture=(stack.capture_port, stack.capture_address),
            mail=stack.mail,
        )
        while not stopping and stack.alive():
            traffic.tick()
            time.sleep(0.2)


def settings_interval() -> float:
    return float(os.environ.get("MAILSYNC_DEMO_TRAFFIC_SECONDS", "4"))


class Traffic:
    """Mail the way it flows for a sales team: contacts write (now and then to a Gmail and an
    Outlook user at once), users write from the CRM and the contact answers, users reply from
    Gmail or Outlook (now and then copying a colleague
    on the other one), a newsletter the workspace excluded, a stranger (never filed), now
    and then a mailbox failing, and now and then a user Bccing the capture address from some
    other mail client (R16), once to a prospect who is no contact yet (the unassigned list)."""

    def __init__(
        self,
        sandbox: str,
        users: list[str],
        interval: float,
        api: str,
        tokens: dict[str, str],
        capture: tuple[int, str] | None = None,
        mail: MailServer | None = None,
    ) -> None:
        self.capture = capture
        self.mail = mail
        # An IMAP mailbox gets traffic only through its mail server.
        users = [u for u in users if provider_of(u) != "IMAP" or mail is not None]
        self.prospect_written = False
        self.sandbox = sandbox
        self.api = api
        self.tokens = tokens
        self.mailbox_ids: dict[str, str] = {}
        # CRM-sent mail waiting for the contact's answer: (user, contact, subject, Message-ID).
        self.awaiting_reply: list[tuple[str, str, str, str]] = []
        self.users = users
        self.interval = interval
        self.next_at = time.monotonic() + 1
        self.count = 0
        self.random = random.Random(7)
        self.received: dict[str, list[tuple[str, str, str]]] = {u: [] for u in users}
        self.http = httpx.Client(trust_env=False, timeout=10)

    def tick(self) -> None:
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.interval
        self.count += 1
        try:
            self._one()
        except (httpx.HTTPError, smtplib.SMTPException, OSError) as exc:
            print(f"  traffic: {exc!r}", flush=True)

    def _one(self) -> None:
        roll = self.random.random()
        user = self.random.choice(self.users)
        if self.count % 15 == 0:
            self.fail(self.users[(self.count // 15) % len(self.users)])
        elif self.capture is not None and self.count % 7 == 3:
            if not self.prospect_written:
                self.prospect_written = True
                self.bcc_capture(user, "pat@prospect.example", "Nice to meet you")
                print(
                    f"  => {user} Bcc'd the capture address writing to pat@prospect.example "
                    "(no contact: the unassigned list)",
                    flush=True,
                )
            else:
                name, contact = self.random.choice(CONTACTS)
                subject = self.random.choice(SUBJECTS)
                self.bcc_capture(user, contact, subject)
                print(f"  => {user} Bcc'd the capture address writing to {contact}", flush=True)
        elif roll < 0.5 or not self.received[user]:
            name, contact = self.random.choice(CONTACTS)
            subject = self.random.choice(SUBJECTS)
            colleague = self._other_side(user) if self.random.random() < 0.3 else None
            self.contact_writes(name, contact, user, subject, cc=colleague)
            copied = f" (cc {colleague})" if colleague else ""
            print(f"  <- {contact} wrote to {user}{copied}: {subject}", flush=True)
        elif roll < 0.75:
            contact, subject, message_id = self.received[user].pop(0)
            colleague = self._other_side(user) if self.random.random() < 0.3 else None
            self.reply(user, contact, subject, message_id, cc=colleague)
            copied = f" (cc {colleague})" if colleague else ""
            print(f"  -> {user} replied to {contact}{copied}: Re: {subject}", flush=True)
        elif roll < 0.82 and self.awaiting_reply:
            user, contact, subject, message_id = self.awaiting_reply.pop(0)
            self.contact_answers(user, contact, subject, message_id)
            print(f"  <- {contact} answered {user}'s CRM email: Re: {subject}", flush=True)
        elif roll < 0.88:
            name, contact = self.random.choice(CONTACTS)
            subject = self.random.choice(SUBJECTS)
            if self.send_from_crm(user, contact, subject):
                print(f"  => {user} wrote to {contact} from the CRM: {subject}", flush=True)
        elif roll < 0.94:
            self._deliver(
                [user], f"Offers <deals@{EXCLUDED_DOMAIN}>", "50% off today", make_msgid()
            )
            print(
                f"  x  newsletter from {EXCLUDED_DOMAIN} to {user} (excluded, not filed)",
                flush=True,
            )
        else:
            self._deliver([user], "someone@unknown.example", "Quick question", make_msgid())
            print(f"  x  a stranger wrote to {user} (no contact, not filed)", flush=True)

    def bcc_capture(self, user: str, to: str, subject: str) -> str:
        """A user writes from a mail client that mailsync does not sync and Bccs the workspace's
        capture address: the SMTP receiver files it (R16)."""
        assert self.capture is not None
        port, address = self.capture
        message = EmailMessage()
        message["From"] = user
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=True)
        message_id = make_msgid(domain=user.partition("@")[2])
        message["Message-ID"] = message_id
        message.set_content("Written on my phone; the CRM gets a copy through the capture address.")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(user, [address], message.as_bytes())
        return message_id

    def _other_side(self, user: str) -> str | None:
        """A colleague whose mailbox is at the other provider."""
        others = [u for u in self.users if provider_of(u) != provider_of(user)]
        return self.random.choice(others) if others else None

    def fail(self, user: str) -> None:
        if provider_of(user) == "IMAP":
            assert self.mail is not None
            # The server drops the connections: IDLE reconnects, the next pass catches up.
            self.mail.kick(user)
            print(f"  ! the IMAP server dropped {user}'s connections", flush=True)
            return
        # The first calls of the next pass fail; the pass retries and catches up.
        path = "/delta" if provider_of(user) == "MICROSOFT" else "/history"
        self.http.post(
            f"{self.sandbox}/_sandbox/faults",
            json={"account": user, "status": 503, "path": path, "times": 2},
        ).raise_for_status()
        where = "Outlook" if provider_of(user) == "MICROSOFT" else "Gmail"
        print(f"  ! {where} is failing for {user} for a while (503)", flush=True)

    def contact_writes(
        self, name: str, contact: str, user: str, subject: str, cc: str | None = None
    ) -> str:
        """A contact's message lands in the user's (and the copied colleague's) mailbox."""
        message_id = make_msgid(domain=contact.split("@")[1])
        recipients = [user, cc] if cc else [user]
        self._deliver(recipients, f"{name} <{contact}>", subject, message_id)
        for recipient in recipients:
            self.received[recipient].append((contact, subject, message_id))
        return message_id

    def send_from_crm(self, user: str, contact: str, subject: str) -> bool:
        """What a user does in the CRM: sendEmail through their own mailbox (R15)."""
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        if user not in self.mailbox_ids:
            found = self.http.post(
                f"{self.api}/graphql", json={"query": MAILBOXES}, headers=headers
            ).json()
            boxes = found["data"]["viewer"]["user"]["mailboxes"]
            if not boxes:
                return False
            self.mailbox_ids[user] = boxes[0]["id"]
        payload = {
            "mailboxId": self.mailbox_ids[user],
            "to": [contact],
            "subject": subject,
            "bodyHtml": f"<p>Hello,</p><p>about <b>{subject.lower()}</b>: see you soon.</p>",
        }
        answer = self.http.post(
            f"{self.api}/graphql",
            json={"query": SEND, "variables": {"input": payload}},
            headers=headers,
        ).json()
        sent = answer["data"]["sendEmail"]
        if sent["email"] is None:
            print(f"  traffic: sendEmail refused: {sent['userErrors']}", flush=True)
            return False
        self.awaiting_reply.append((user, contact, subject, sent["email"]["messageId"]))
        return True

    def contact_answers(self, user: str, contact: str, subject: str, message_id: str) -> None:
        name = next(n for n, a in CONTACTS if a == contact)
        self._deliver(
            [user], f"{name} <{contact}>", f"Re: {subject}", make_msgid(), in_reply_to=message_id
        )

    def _deliver(
        self,
        users: list[str],
        sender: str,
        subject: str,
        message_id: str,
        in_reply_to: str | None = None,
    ) -> None:
        message = EmailMessage()
        message["From"] = sender
        message["To"] = users[0]
        if users[1:]:
            message["Cc"] = ", ".join(users[1:])
        message["Subject"] = subject
        message["Message-ID"] = message_id
        message["Date"] = formatdate(usegmt=True)
        if in_reply_to:
            message["In-Reply-To"] = in_reply_to
            message["References"] = in_reply_to
        message.set_content(f"{subject}\n\nSent by the mailsync demo traffic generator.")
        raw = {"rawBase64": base64.b64encode(message.as_bytes()).decode()}
        # What the sender's mail server does: one copy into each recipient's mailbox.
        for user in users:
            if provider_of(user) == "IMAP":
                assert self.mail is not None
                with smtplib.SMTP("127.0.0.1", self.mail.ports.smtp, timeout=30) as smtp:
                    smtp.sendmail(sender.split("<")[-1].rstrip(">"), [user], message.as_bytes())
                continue
            side = "microsoft" if provider_of(user) == "MICROSOFT" else "google"
            self.http.post(
                f"{self.sandbox}/_sandbox/{side}/accounts/{user}/messages", json=raw
            ).raise_for_status()

    def reply(
        self, user: str, contact: str, subject: str, message_id: str, cc: str | None = None
    ) -> None:
        if provider_of(user) == "MICROSOFT":
            self._reply_from_outlook(user, message_id, cc)
        elif provider_of(user) == "IMAP":
            self._reply_from_mail_program(user, contact, subject, message_id, cc)
        else:
            self._reply_from_gmail(user, contact, subject, message_id, cc)

    def _reply_from_gmail(
        self, user: str, contact: str, subject: str, message_id: str, cc: str | None
    ) -> None:
        token = self.http.post(f"{self.sandbox}/_sandbox/google/accounts/{user}/token").json()
        message = EmailMessage()
        message["From"] = user
        message["To"] = contact
        if cc:
            message["Cc"] = cc
        message["Subject"] = f"Re: {subject}"
        message["In-Reply-To"] = message_id
        message["References"] = message_id
        message.set_content("Thanks, I'll get back to you today.")
        raw = base64.urlsafe_b64encode(message.as_bytes()).decode()
        self.http.post(
            f"{self.sandbox}/gmail/v1/users/me/messages/send",
            json={"raw": raw},
            headers={"Authorization": f"Bearer {token['access_token']}"},
        ).raise_for_status()

    def _reply_from_mail_program(
        self, user: str, contact: str, subject: str, message_id: str, cc: str | None
    ) -> None:
        """What a mail program does: SMTP submission, then a copy in the Sent folder."""
        assert self.mail is not None
        message = EmailMessage()
        message["From"] = user
        message["To"] = contact
        if cc:
            message["Cc"] = cc
        message["Subject"] = f"Re: {subject}"
        message["Message-ID"] = make_msgid(domain=user.partition("@")[2])
        message["Date"] = formatdate(usegmt=True)
        message["In-Reply-To"] = message_id
        message["References"] = message_id
        message.set_content("Thanks, I'll get back to you today.")
        context = ssl.create_default_context(cafile=str(self.mail.cert))
        with smtplib.SMTP_SSL(
            "127.0.0.1", self.mail.ports.submissions, context=context, timeout=30
        ) as smtp:
            smtp.login(user, IMAP_PASSWORD)
            smtp.send_message(message)
        with imaplib.IMAP4_SSL("127.0.0.1", self.mail.ports.imaps, ssl_context=context) as imap:
            imap.login(user, IMAP_PASSWORD)
            imap.append("Sent", "(\\Seen)", None, message.as_bytes())
        if cc:
            self._deliver_copy_to_colleague(cc, message)

    def _deliver_copy_to_colleague(self, cc: str, message: EmailMessage) -> None:
        """Postfix delivers every address to Dovecot; a colleague on Gmail or Outlook gets
        the copy through the sandbox, as that provider's MX would."""
        if provider_of(cc) == "IMAP":
            return
        side = "microsoft" if provider_of(cc) == "MICROSOFT" else "google"
        raw = {"rawBase64": base64.b64encode(message.as_bytes()).decode()}
        self.http.post(
            f"{self.sandbox}/_sandbox/{side}/accounts/{cc}/messages", json=raw
        ).raise_for_status()

    def _reply_from_outlook(self, user: str, message_id: str, cc: str | None) -> None:
        """What Outlook does on Reply: createReply on the received message, then send."""
        token = self.http.post(f"{self.sandbox}/_sandbox/microsoft/accounts/{user}/token").json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        graph = f"{self.sandbox}/v1.0/me/messages"
        escaped = message_id.replace("'", "''")
        found = self.http.get(
            graph,
            params={"$filter": f"internetMessageId eq '{escaped}'", "$select": "id"},
            headers=headers,
        )
        found.raise_for_status()
        originals = found.json()["value"]
        if not originals:
            return
        body: dict[str, object] = {"comment": "Thanks, I'll get back to you today."}
        if cc:
            body["message"] = {"ccRecipients": [{"emailAddress": {"address": cc}}]}
        draft = self.http.post(
            f"{graph}/{originals[0]['id']}/createReply", json=body, headers=headers
        )
        draft.raise_for_status()
        self.http.post(f"{graph}/{draft.json()['id']}/send", headers=headers).raise_for_status()
