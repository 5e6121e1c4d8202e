"""A small GraphQL client for tests: HTTP through httpx, websockets through `websockets`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import websockets
from websockets.typing import Subprotocol

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"

# Generous bounds for work to happen on a loaded two-core machine; a test asserting that
# something does NOT happen passes its own, short, time instead.
WORK_TIMEOUT = 30.0

# How many subscriptions the server's event hub holds (for the subscriber's workspace, or
# in all when the process serves only the test): see `subscribe`.
SubscriberCount = Callable[[], Awaitable[int]]


class GraphQLFailed(AssertionError):
    pass


class GQL:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def raw(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            response = await client.post(
                "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
            )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def __call__(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        body = await self.raw(query, variables, token)
        if body.get("errors"):
            raise GraphQLFailed(json.dumps(body["errors"], indent=2))
        data: dict[str, Any] = body["data"]
        return data


def error_codes(body: dict[str, Any]) -> list[str | None]:
    return [e.get("extensions", {}).get("code") for e in body.get("errors") or []]


class Subscription:
    def __init__(self, ws: Any, protocol: str, op_id: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.op_id = op_id

    async def next(self, timeout: float = WORK_TIMEOUT) -> dict[str, Any]:
        """The next data payload of this operation (skipping keep-alives)."""
        async with asyncio.timeout(timeout):
            while True:
                message = json.loads(await self.ws.recv())
                kind = message.get("type")
                if kind in {"ka", "ping", "pong"}:
                    if kind == "ping":
                        await self.ws.send(json.dumps({"type": "pong"}))
                    continue
                if message.get("id") not in (None, self.op_id):
                    continue  # another operation on the same connection
                if kind in {"next", "data"}:
                    payload: dict[str, Any] = message["payload"]
                    return payload
                if kind in {"error", "complete"}:
                    raise GraphQLFailed(json.dumps(message))

    async def nothing_within(self, seconds: float) -> None:
        try:
            payload = await self.next(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no event, got {payload}")


@asynccontextmanager
async def ws_connect(
    url: str, token: str | None, protocols: list[str] | None = None
) -> AsyncIterator[tuple[Any, str]]:
    offered = protocols or [TRANSPORT_WS]
    async with websockets.connect(
        url, subprotocols=[Subprotocol(p) for p in offered], open_timeout=WORK_TIMEOUT
    ) as ws:
        protocol = ws.subprotocol or offered[0]
        payload = {"Authorization": f"Bearer {token}"} if token else {}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        while True:
            ack = json.loads(await asyncio.wait_for(ws.recv(), WORK_TIMEOUT))
            if ack.get("type") != "ka":
                break
        if ack.get("type") != "connection_ack":
            raise GraphQLFailed(json.dumps(ack))
        yield ws, protocol


async def start(
    ws: Any, protocol: str, op_id: str, query: str, variables: dict[str, Any] | None = None
) -> Subscription:
    kind = "subscribe" if protocol == TRANSPORT_WS else "start"
    await ws.send(
        json.dumps(
            {"id": op_id, "type": kind, "payload": {"query": query, "variables": variables or {}}}
        )
    )
    return Subscription(ws, protocol, op_id)


@asynccontextmanager
async def subscribe(
    url: str,
    token: str,
    query: str,
    variables: dict[str, Any] | None = None,
    protocol: str = TRANSPORT_WS,
    *,
    subscribers: SubscriberCount,
) -> AsyncIterator[Subscription]:
    """A subscription that is registered with the server's event hub when this yields.

    Neither websocket protocol acknowledges a subscribe, and a `ping` sent after it proves
    nothing: Strawberry answers the ping at once while the operation runs in its own task,
    which reaches the hub only when the resolver's generator first runs. So this waits until
    `subscribers()` counts one more than before the subscribe."""
    async with ws_connect(url, token, [protocol]) as (ws, chosen):
        before = await subscribers()
        sub = await start(ws, chosen, "1", query, variables)
        deadline = asyncio.get_running_loop().time() + WORK_TIMEOUT
        while await subscribers() <= before:  # polled: the hub signals nothing on the wire
            if asyncio.get_running_loop().time() > deadline:
                raise GraphQLFailed(
                    f"the subscription was not registered within {WORK_TIMEOUT:.0f} s "
                    f"(refused? the server's answer is on the socket): {query}"
                )
            await asyncio.sleep(0.01)
        yield sub
