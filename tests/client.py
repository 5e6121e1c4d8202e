"""A small GraphQL client for tests: HTTP through httpx, websockets through `websockets`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import websockets

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"


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

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
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
    async with websockets.connect(url, subprotocols=offered) as ws:  # type: ignore[arg-type]
        protocol = ws.subprotocol or offered[0]
        payload = {"Authorization": f"Bearer {token}"} if token else {}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        while True:
            ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
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
) -> AsyncIterator[Subscription]:
    async with ws_connect(url, token, [protocol]) as (ws, chosen):
        sub = await start(ws, chosen, "1", query, variables)
        # Give the server a moment to register the subscription before events are sent.
        await asyncio.sleep(0.2)
        yield sub
