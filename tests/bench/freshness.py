"""Benchmark: how fresh the timeline is. From a message landing in the sandbox's mailbox
(Gmail `messages.insert`; Outlook: delivery, `tests.bench.freshness_microsoft`) to the
`emailReceived` frame at a websocket client, over N messages; prints p50, p90, p99, max.

    uv run python -m tests.bench.freshness [--count 200] [--interval 0.25] [--poll 0.05]

It runs the demo's stack (sandbox, worker and API as separate processes, on a fresh SQLite
unless MAILSYNC_DATABASE_URL is set, against MAILSYNC_REDIS_URL or a private redis-server):
a contact writes to the mailbox every `interval` seconds, the sandbox pushes to the webhook
(Pub/Sub, Graph change notifications), the worker runs a pass, and the API relays the event.
Aim: p99 under 2 seconds.

The baseline, in the same run over the same messages: a bare client polling the provider's
message list every `poll` seconds, the freshest any reader of the mailbox can be. The last
line is `freshness ratio: <product p99 / baseline p99>`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import statistics
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import httpx
import websockets

from backend.demo import CONTACTS, OUTLOOK_EMAIL, OWNER_EMAIL, running_stack
from backend.settings import Settings

SUBSCRIPTION = "subscription { emailReceived { email { subject } } }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _message(sender: str, to: str, subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    message["Date"] = formatdate(usegmt=True)
    message.set_content(f"{subject}\n\nA freshness probe.")
    return message.as_bytes()


class Mailbox:
    """The provider side of the bench: deliver a message, list the newest message ids."""

    def __init__(self, provider: str, http: httpx.AsyncClient, address: str) -> None:
        self.provider = provider
        self.http = http
        self.address = address
        self.headers: dict[str, str] = {}

    async def sign_in(self) -> None:
        kind = "microsoft" if self.provider == "microsoft" else "google"
        grant = await self.http.post(f"/_sandbox/{kind}/accounts/{self.address}/token")
        self.headers = {"Authorization": f"Bearer {grant.json()['access_token']}"}

    async def deliver(self, raw: bytes) -> str:
        encoded = base64.b64encode(raw).decode()
        if self.provider == "microsoft":
            answer = await self.http.post(
                f"/_sandbox/microsoft/accounts/{self.address}/messages",
                json={"rawBase64": encoded},
            )
        else:
            answer = await self.http.post(
                "/gmail/v1/users/me/messages",
                json={
                    "raw": base64.urlsafe_b64encode(raw).decode(),
                    "labelIds": ["INBOX", "UNREAD"],
                },
                headers=self.headers,
            )
        answer.raise_for_status()
        return str(answer.json()["id"])

    async def newest(self) -> set[str]:
        if self.provider == "microsoft":
            answer = await self.http.get(
                "/v1.0/me/messages", params={"$top": "20", "$select": "id"}, headers=self.headers
            )
            answer.raise_for_status()
            return {m["id"] for m in answer.json().get("value", [])}
        answer = await self.http.get(
            "/gmail/v1/users/me/messages", params={"maxResults": "20"}, headers=self.headers
        )
        answer.raise_for_status()
        return {m["id"] for m in answer.json().get("messages", [])}


async def measure(
    api: str, sandbox: str, token: str, provider: str, args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """(product latencies, baseline latencies), each sorted."""
    count, interval = args.count, args.interval
    user = OUTLOOK_EMAIL if provider == "microsoft" else OWNER_EMAIL
    sent_at: dict[str, float] = {}
    latencies: dict[str, float] = {}
    provider_ids: dict[str, float] = {}
    polled: dict[str, float] = {}
    ws_url = api.replace("http://", "ws://") + "/graphql"
    async with (
        websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws,  # type: ignore[list-item]
        httpx.AsyncClient(base_url=sandbox, trust_env=False, timeout=10) as http,
    ):
        await ws.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        )
        assert json.loads(await ws.recv())["type"] == "connection_ack"
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION}})
        )

        async def receive() -> None:
            while len(latencies) < count:
                frame = json.loads(await ws.recv())
                if frame.get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong"}))
                if frame.get("type") != "next":
                    continue
                subject = frame["payload"]["data"]["emailReceived"]["email"]["subject"]
                if subject in sent_at and subject not in latencies:
                    latencies[subject] = time.perf_counter() - sent_at[subject]

        receiver = asyncio.create_task(receive())
        # Nothing on the wire acknowledges a subscribe: wait until the API's event hub holds
        # it (the bench's API process serves no other subscriber).
        async with asyncio.timeout(30):
            while True:
                if (await http.get(f"{api}/readyz")).json()["subscribers"] >= 1:
                    break
                await asyncio.sleep(0.02)
        mailbox = Mailbox(provider, http, user)
        await mailbox.sign_in()

        async def poll() -> None:
            # The baseline: a bare reader polling the provider's newest messages.
            while len(polled) < count:
                seen = await mailbox.newest()
                moment = time.perf_counter()
                for provider_id in seen & provider_ids.keys():
                    polled.setdefault(provider_id, moment - provider_ids[provider_id])
                await asyncio.sleep(args.poll)

        poller = asyncio.create_task(poll())
        for n in range(count):
            name, address = CONTACTS[n % len(CONTACTS)]
            subject = f"Freshness probe {n}"
            raw = _message(f"{name} <{address}>", user, subject)
            sent_at[subject] = time.perf_counter()
            provider_ids[await mailbox.deliver(raw)] = sent_at[subject]
            await asyncio.sleep(interval)
        for task, what in ((receiver, "the API"), (poller, "the baseline poller")):
            try:
                await asyncio.wait_for(task, timeout=30)
            except TimeoutError:
                print(f"{what}: some of {count} messages never arrived within 30 s")
    return sorted(latencies.values()), sorted(polled.values())


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, round(fraction * (len(values) - 1)))]


def describe(name: str, latencies: list[float], interval: float) -> str:
    return (
        f"{name} over {len(latencies)} messages (one every {interval:.2f} s): "
        f"p50 {percentile(latencies, 0.5):.3f} s, p90 {percentile(latencies, 0.9):.3f} s, "
        f"p99 {percentile(latencies, 0.99):.3f} s, max {latencies[-1]:.3f} s, "
        f"mean {statistics.fmean(latencies):.3f} s"
    )


def main(provider: str = "gmail") -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between inserts")
    parser.add_argument("--poll", type=float, default=0.05, help="the baseline's poll period")
    args = parser.parse_args()
    user = OUTLOOK_EMAIL if provider == "microsoft" else OWNER_EMAIL
    with running_stack(Settings(), "127.0.0.1", _free_port(), quiet=True) as stack:
        latencies, baseline = asyncio.run(
            measure(stack.api, stack.sandbox, stack.tokens[user], provider, args)
        )
    if not latencies or not baseline:
        raise SystemExit("no emailReceived event arrived, or the baseline saw nothing")
    print(describe(f"{provider} freshness", latencies, args.interval))
    print(describe(f"baseline (polling every {args.poll:.2f} s)", baseline, args.interval))
    print(f"freshness ratio: {percentile(latencies, 0.99) / percentile(baseline, 0.99):.3f}")


if __name__ == "__main__":
    main()
