"""R14: a pass whose worker is killed mid-pass is taken over by another worker within the job
lease (not the pass timeout), and the mail it was syncing is filed exactly once."""

from __future__ import annotations

import asyncio
import signal

import pytest

from backend.mailboxes.tables import MailboxStatus
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from tests.client import GQL
from tests.factories import Factory, raw_message
from tests.sandbox import SandboxServer
from tests.sync_helpers import reload_mailbox, wait_until
from tests.test_gmail import connected, deliver, emails_of
from tests.worker import worker_process

pytestmark = pytest.mark.e2e  # starts worker processes

# A pass may run this long; its worker holds its claim on the job only for the job lease
# (MAILSYNC_JOB_LEASE_SECONDS, 30 s), renewing it while the worker lives.
PASS_TIMEOUT = 300
# Well below the pass timeout: a dead worker's pass must not wait for it.
TAKEOVER_DEADLINE = 120


async def test_r14_a_pass_killed_mid_way_is_resumed_by_another_worker_well_before_its_timeout(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    await factory.contact(owner, "kim@client.test", "Kim")
    await deliver(google, address, raw_message("kim@client.test", [address], "Survives"))
    await google.google.drain_pushes()
    # The first pass hangs inside Gmail's history call until its worker is killed.
    hang = google.google.faults.add(
        Fault(delay_seconds=120, account=address, path="/history", times=1)
    )
    with worker_process(PASS_TIMEOUT) as doomed:
        await runtime.jobs.enqueue_sync(str(mailbox_id))

        async def hanging() -> bool:
            return hang.hits == 1

        await wait_until(hanging, 30)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    assert await emails_of(runtime, owner.workspace.id) == []

    with worker_process(PASS_TIMEOUT):

        async def filed() -> bool:
            return bool(await emails_of(runtime, owner.workspace.id))

        await wait_until(filed, TAKEOVER_DEADLINE)
        # Let any second pass the takeover might start finish before counting.
        await asyncio.sleep(1)
        emails = await emails_of(runtime, owner.workspace.id)
    assert [e.subject for e in emails] == ["Survives"]
    assert (await reload_mailbox(runtime, mailbox_id)).status == MailboxStatus.ACTIVE
