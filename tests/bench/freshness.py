"""Benchmark: how fresh the timeline is. From `messages.insert` in the Gmail sandbox to the
`emailReceived` frame at a websocket client, over N messages; prints p50, p90, p99, max.

    uv run python -m tests.bench.freshness [--count 200] [--interval 0.25]

It runs the demo's stack (sandbox, worker and API as separate processes, on a fresh SQLite
unless MAILSYNC_DATABASE_URL is set, against MAILSYNC_REDIS_URL or a private redis-server):
a contact writes to the owner's Gmail every `interval` seconds, the sandbox pushes to the
webhook, the worker runs a pass, and the API relays the event. Aim: p99 under 2 seconds.
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

from backend.demo import CONTACTS, OWNER_EMAIL, running_stack
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


async def measure(api: str, sandbox: str, token: str, count: int, interval: float) -> list[float]:
    sent_at: dict[str, float] = {}
    latencies: dict[str, float] = {}
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
        grant = await http.post(f"/_sandbox/google/accounts/{OWNER_EMAIL}/token")
        headers = {"Authorization": f"Bearer {grant.json()['access_token']}"}
        for n in range(count):
            name, address = CONTACTS[n % len(CONTACTS)]
            subject = f"Freshness probe {n}"
            raw = base64.urlsafe_b64encode(
                _message(f"{name} <{address}>", OWNER_EMAIL, subject)
            ).decode()
            sent_at[subject] = time.perf_counter()
            answer = await http.post(
                "/gmail/v1/users/me/messages",
                json={"raw": raw, "labelIds": ["INBOX", "UNREAD"]},
                headers=headers,
            )
            answer.raise_for_status()
            await asyncio.sleep(interval)
        try:
            await asyncio.wait_for(receiver, timeout=30)
        except TimeoutError:
            print(f"{count - len(latencies)} of {count} messages never arrived within 30 s")
    return sorted(latencies.values())


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, round(fraction * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between inserts")
    args = parser.parse_args()
    with running_stack(Settings(), "127.0.0.1", _free_port(), quiet=True) as stack:
        latencies = asyncio.run(
            measure(stack.api, stack.sandbox, stack.tokens[OWNER_EMAIL], args.count, args.interval)
        )
    if not latencies:
        raise SystemExit("no emailReceived event arrived")
    print(
        f"freshness over {len(latencies)} messages (one every {args.interval:.2f} s): "
        f"p50 {percentile(latencies, 0.5):.3f} s, p90 {percentile(latencies, 0.9):.3f} s, "
        f"p99 {percentile(latencies, 0.99):.3f} s, max {latencies[-1]:.3f} s, "
        f"mean {statistics.fmean(latencies):.3f} s"
    )


if __name__ == "__main__":
    main()
