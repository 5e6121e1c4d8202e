"""The README's first command: `mailsync demo`, watched from GraphiQL in a real browser."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from backend.demo import IMAP_EMAIL, OUTLOOK_EMAIL, OWNER_EMAIL, Traffic, running_stack
from backend.sandbox import mailserver
from backend.settings import Settings
from tests.browser import chromium
from tests.conftest import REDIS_URL, free_port

pytestmark = pytest.mark.e2e  # starts `mailsync demo` and Chromium

DEMO_REDIS_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"


@pytest.fixture
async def demo_url() -> AsyncIterator[str]:
    redis = Redis.from_url(DEMO_REDIS_URL)
    await redis.flushdb()
    await redis.aclose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSYNC_")}
    env.update(
        {
            "MAILSYNC_REDIS_URL": DEMO_REDIS_URL,
            "MAILSYNC_DEMO_TRAFFIC_SECONDS": "1",
            "MAILSYNC_LOG_LEVEL": "WARNING",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backend.cli",
        "demo",
        "--port",
        str(free_port()),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        link = None
        async with asyncio.timeout(90):
            while link is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited before printing its GraphiQL link"
                if "/graphql?token=" in line:
                    link = line.strip()
        drain = asyncio.create_task(proc.stdout.read())
        yield link
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()


async def test_graphiql_from_the_demo_shows_email_received_events_offline(demo_url: str) -> None:
    async with chromium(demo_url) as page:
        await page.wait_for("!!document.querySelector('.graphiql-execute-button')", timeout=30)
        # Two operations in the editor: the run button opens (on pointerdown, as a Radix
        # menu does) a menu asking which one to run. Until GraphiQL has settled, the menu
        # may close again, so press until it stays open.
        await page.wait_for(
            "(() => { const live = [...document.querySelectorAll('[role=menuitem]')]"
            ".some(i => i.textContent.trim() === 'Live'); if (!live) document.querySelector("
            "'.graphiql-execute-button').dispatchEvent(new PointerEvent('pointerdown', "
            "{bubbles: true, button: 0, pointerType: 'mouse'})); return live; })()",
            timeout=30,
        )
        await page.evaluate(
            "[...document.querySelectorAll('[role=menuitem]')].find(i => i.textContent.trim() === 'Live').click()"
        )
        shown = await page.wait_for(
            "(() => { const r = document.querySelector('.graphiql-response');"
            " const t = r ? r.innerText : ''; return t.includes('emailReceived') ? t : ''; })()",
            timeout=45,
        )
    assert '"subject"' in shown and '"direction"' in shown


ADA_TIMELINE = """query($search: String) { contacts(search: $search) { edges { node {
  timeline(first: 20) { totalCount edges { node {
    subject direction deliveryStatus thread { id } sentBy { email } mailbox { provider emailAddress } } } } } } } }"""
MAILBOXES = "{ mailboxes { id provider emailAddress status lastSyncedAt } }"


def test_the_demo_connects_outlook_and_mail_crossing_gmail_and_outlook_is_filed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("MAILSYNC_")]:
        monkeypatch.delenv(name)
    asyncio.run(_flush(DEMO_REDIS_URL))
    settings = Settings(redis_url=DEMO_REDIS_URL, log_level="WARNING")
    with (
        running_stack(settings, "127.0.0.1", free_port(), quiet=True) as stack,
        httpx.Client(base_url=stack.api, trust_env=False, timeout=30) as http,
    ):
        token = stack.tokens[OWNER_EMAIL]

        def gql(query: str, **variables: Any) -> dict[str, Any]:
            answer = http.post(
                "/graphql",
                json={"query": query, "variables": variables},
                headers={"Authorization": f"Bearer {token}"},
            ).json()
            assert "errors" not in answer, answer
            return dict(answer["data"])

        mailboxes = {m["emailAddress"]: m for m in gql(MAILBOXES)["mailboxes"]}
        assert mailboxes[OUTLOOK_EMAIL]["provider"] == "MICROSOFT"
        assert mailboxes[OWNER_EMAIL]["provider"] == "GMAIL"

        # Ada writes to Max's Outlook and copies Olivia's Gmail; Max answers from Outlook
        # and copies Sam, whose Gmail receives it from the Outlook side.
        traffic = Traffic(stack.sandbox, list(stack.tokens), 0, stack.api, stack.tokens)
        subject = "Cross-provider quote"
        message_id = traffic.contact_writes(
            "Ada Lovelace", "ada@analytical.example", OUTLOOK_EMAIL, subject, cc=OWNER_EMAIL
        )

        def timeline() -> list[dict[str, Any]]:
            contact = gql(ADA_TIMELINE, search="ada@analytical.example")["contacts"]["edges"]
            return [e["node"] for e in contact[0]["node"]["timeline"]["edges"]]

        _until(lambda: any(e["subject"] == subject for e in timeline()))
        traffic.reply(
            OUTLOOK_EMAIL,
            "ada@analytical.example",
            subject,
            message_id,
            cc="sam@demo.mailsync.test",
        )
        _until(lambda: any(e["direction"] == "OUTGOING" for e in timeline()))

        # Olivia writes to Grace from the CRM (R15); Grace answers into Olivia's Gmail.
        assert traffic.send_from_crm(OWNER_EMAIL, "grace@cobol.example", "From the CRM")
        _, grace, crm_subject, crm_message_id = traffic.awaiting_reply.pop()
        traffic.contact_answers(OWNER_EMAIL, grace, crm_subject, crm_message_id)

        def grace_timeline() -> list[dict[str, Any]]:
            contact = gql(ADA_TIMELINE, search=grace)["contacts"]["edges"]
            return [e["node"] for e in contact[0]["node"]["timeline"]["edges"]]

        _until(lambda: len(grace_timeline()) == 2)

        # R16: Olivia Bccs the capture address from another mail client, to Katherine (a
        # contact) and to a prospect (no contact: the unassigned list); both through SMTP.
        traffic.capture = (stack.capture_port, stack.capture_address)
        traffic.bcc_capture(OWNER_EMAIL, "katherine@orbit.example", "Captured")
        traffic.bcc_capture(OWNER_EMAIL, "pat@prospect.example", "Nice to meet you")
        katherine = gql(ADA_TIMELINE, search="katherine@orbit.example")["contacts"]["edges"]
        captured = [e["node"] for e in katherine[0]["node"]["timeline"]["edges"]]
        assert [(e["subject"], e["sentBy"]["email"]) for e in captured] == [
            ("Captured", OWNER_EMAIL)
        ]
        unassigned = gql("{ unassignedEmails { edges { node { subject source } } } }")
        assert [e["node"] for e in unassigned["unassignedEmails"]["edges"]] == [
            {"subject": "Nice to meet you", "source": "CAPTURE"}
        ]

        # Every mailbox finishes a pass that began after all of this was delivered.
        asked_at = datetime.now(UTC)
        for mailbox in mailboxes.values():
            gql(
                "mutation($id: ID!) { syncMailbox(id: $id) { userErrors { code } } }",
                id=mailbox["id"],
            )
        _until(
            lambda: all(
                m["lastSyncedAt"] and datetime.fromisoformat(m["lastSyncedAt"]) > asked_at
                for m in gql(MAILBOXES)["mailboxes"]
            )
        )

        emails = timeline()
        assert sorted(e["direction"] for e in emails) == ["INCOMING", "OUTGOING"]
        incoming, outgoing = sorted(emails, key=lambda e: e["direction"])
        assert incoming["subject"] == subject
        assert outgoing["subject"].lower() == f"re: {subject}".lower()
        assert outgoing["sentBy"]["email"] == OUTLOOK_EMAIL
        assert outgoing["mailbox"]["provider"] == "MICROSOFT"
        assert incoming["thread"]["id"] == outgoing["thread"]["id"]
        answer, crm = sorted(grace_timeline(), key=lambda e: e["direction"])
        assert crm["subject"] == "From the CRM" and crm["deliveryStatus"] == "SENT"
        assert answer["subject"] == "Re: From the CRM"
        assert answer["thread"]["id"] == crm["thread"]["id"]


async def _flush(url: str) -> None:
    redis = Redis.from_url(url)
    await redis.flushdb()
    await redis.aclose()


def _until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.skipif(
    not mailserver.available() and not os.environ.get("CI"),
    reason="scripts/test installs Dovecot, Postfix",
)
def test_the_demo_connects_an_imap_mailbox_whose_traffic_is_filed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [k for k in os.environ if k.startswith("MAILSYNC_")]:
        monkeypatch.delenv(name)
    asyncio.run(_flush(DEMO_REDIS_URL))
    settings = Settings(redis_url=DEMO_REDIS_URL, log_level="WARNING")
    with (
        running_stack(settings, "127.0.0.1", free_port(), quiet=True) as stack,
        httpx.Client(base_url=stack.api, trust_env=False, timeout=30) as http,
    ):
        token = stack.tokens[IMAP_EMAIL]
        query = """{ mailboxes { provider emailAddress }
          emails(first: 10) { edges { node { subject mailbox { provider } } } } }"""

        def mine() -> dict[str, Any]:
            answer = http.post(
                "/graphql", json={"query": query}, headers={"Authorization": f"Bearer {token}"}
            ).json()
            assert "errors" not in answer, answer
            return dict(answer["data"])

        assert mine()["mailboxes"] == [{"provider": "IMAP", "emailAddress": IMAP_EMAIL}]
        traffic = Traffic(
            stack.sandbox, list(stack.tokens), 0, stack.api, stack.tokens, mail=stack.mail
        )
        assert IMAP_EMAIL in traffic.users
        traffic.contact_writes("Ada Lovelace", "ada@analytical.example", IMAP_EMAIL, "By IMAP")
        # Through Postfix and Dovecot, then IDLE (or the first scheduled pass) and the worker.
        _until(
            lambda: (
                {"subject": "By IMAP", "mailbox": {"provider": "IMAP"}}
                in [e["node"] for e in mine()["emails"]["edges"]]
            ),
            seconds=120,
        )
