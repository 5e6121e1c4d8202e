"""R15: a send whose worker dies after the provider accepted the mail, but before the worker
recorded it, is taken over by another worker that finds the mail and does not send it again."""

from __future__ import annotations

import signal

import pytest

from backend.mail.tables import DeliveryStatus
from backend.runtime import Runtime
from backend.sandbox.faults import Fault
from tests.client import GQL
from tests.factories import Factory
from tests.sandbox import SandboxServer
from tests.sync_helpers import wait_until
from tests.test_gmail import connected
from tests.test_sending import gmail_contact, inbox_of, send, stored
from tests.worker import worker_process

pytestmark = pytest.mark.e2e  # starts worker processes

# arq retries a dead worker's job the longest job timeout + 10 seconds after it started.
JOB_TIMEOUT = 3


async def test_r15_a_worker_killed_after_the_provider_accepted_the_mail_sends_it_once(
    gql: GQL, factory: Factory, google: SandboxServer, runtime: Runtime
) -> None:
    owner, mailbox_id, address = await connected(gql, factory, google, runtime)
    ann = await gmail_contact(factory, google, owner)
    # Gmail takes the message, delivers it, and then its answer never reaches the worker.
    lost_answer = google.google.faults.add(
        Fault(after_delay_seconds=600, account=address, path="/messages/send", times=1)
    )
    with worker_process(JOB_TIMEOUT) as doomed:
        result = await send(gql, owner, mailbox_id, to=[ann], subject="Exactly once")
        assert result["userErrors"] == []

        async def delivered() -> bool:
            return lost_answer.hits == 1 and len(await inbox_of(google, ann)) == 1

        await wait_until(delivered, 60)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)
    email = await stored(runtime, result["email"]["id"])
    assert email.delivery_status == DeliveryStatus.QUEUED  # the worker never heard back

    with worker_process(JOB_TIMEOUT):

        async def settled() -> bool:
            row = await stored(runtime, result["email"]["id"])
            return row.delivery_status != DeliveryStatus.QUEUED

        await wait_until(settled, JOB_TIMEOUT + 10 + 60)
    assert (await stored(runtime, result["email"]["id"])).delivery_status == DeliveryStatus.SENT
    assert len(await inbox_of(google, ann)) == 1
    assert len(await inbox_of(google, address, "SENT")) == 1
