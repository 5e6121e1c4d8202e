"""Hostile requests: oversized bodies and documents, fragment bombs (issue 13)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
from graphql import OperationDefinitionNode, parse

from backend.graphql.limits import DocumentCost
from tests.client import error_codes
from tests.conftest import LiveServer


def fragment_bomb(levels: int, head: str = "") -> str:
    """Each fragment spreads the next one twice: `levels` fragments expand to 2**levels."""
    parts = ["query Bomb { ...F0 }"]
    parts += [f"fragment F{i} on Query {{ {head}...F{i + 1} ...F{i + 1} }}" for i in range(levels)]
    parts.append(f"fragment F{levels} on Query {{ viewer {{ user {{ id }} }} }}")
    return "\n".join(parts)


def aliased_bomb(levels: int) -> str:
    """A fragment bomb with an alias in each fragment: 2**levels - 1 aliases once expanded."""
    parts = ["query Deep { ...F0 }"]
    parts += [
        f'fragment F{i} on Query {{ a{i}: node(id: "x") {{ id }} '
        f"viewer {{ workspace {{ id }} }} ...F{i + 1} ...F{i + 1} }}"
        for i in range(levels)
    ]
    parts.append(f"fragment F{levels} on Query {{ viewer {{ user {{ id }} }} }}")
    return "\n".join(parts)


async def post(api: LiveServer, query: str) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        started = time.perf_counter()
        response = await client.post("/graphql", json={"query": query})
        return response, time.perf_counter() - started


async def test_a_fragment_bomb_is_refused_with_a_code_and_cheaply(api: LiveServer) -> None:
    """Strawberry's limiters walked every spread of every fragment again: this 1 KB document
    took them seconds (2**20 walks), on the event loop, before authentication."""
    query = fragment_bomb(20, head="a: viewer { user { id } } ")
    assert len(query) < 2000
    response, elapsed = await post(api, query)
    assert response.status_code == 200
    assert error_codes(response.json()) == ["TOO_MANY_ALIASES"]
    # A generous bound (the fix answers in milliseconds; the old limiters took ~10 s here).
    assert elapsed < 3.0

    # Without aliases the bomb is a harmless query (fields merge): it runs, unauthenticated.
    response, elapsed = await post(api, fragment_bomb(20))
    assert error_codes(response.json()) == ["UNAUTHENTICATED"]
    assert elapsed < 3.0


def test_the_cost_of_a_document_is_measured_visiting_each_fragment_once() -> None:
    for levels in (10, 20, 40):
        document = parse(aliased_bomb(levels))
        operation = document.definitions[0]
        assert isinstance(operation, OperationDefinitionNode)
        cost = DocumentCost(document, cap=10**6)
        measure = cost.operation(operation)
        # 2**levels aliases once expanded (capped), counted in work linear in the document.
        assert measure.aliases == min(2**levels - 1, 10**6)
        assert cost.visited <= 8 * levels + 8


async def test_documents_are_limited_in_length_and_tokens(api: LiveServer) -> None:
    padded = "{ viewer { user { id } } }" + "#" * 60_000
    response, _ = await post(api, padded)
    assert error_codes(response.json()) == ["QUERY_TOO_LARGE"]
    assert response.status_code == 200  # application/json: errors in a 200, as the spec says

    many_tokens = "{ viewer { user { " + "id " * 6_000 + "} } }"
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        response = await client.post(
            "/graphql",
            json={"query": many_tokens},
            headers={"Accept": "application/graphql-response+json"},
        )
    assert error_codes(response.json()) == ["QUERY_TOO_LARGE"]
    assert response.status_code == 400
    assert "6000" not in response.text and len(response.text) < 500


async def test_request_bodies_are_limited_on_every_route(api: LiveServer) -> None:
    settings = api.app.state.runtime.settings
    big = b"x" * (settings.max_request_bytes + 1)

    async def chunks(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 65536 + 1):
            yield b"y" * 65536

    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        declared = await client.post(
            "/graphql", content=big, headers={"Content-Type": "application/json"}
        )
        streamed = await client.post(
            "/graphql",
            content=chunks(settings.max_request_bytes),
            headers={"Content-Type": "application/json"},
        )
        webhook = await client.post(
            "/webhooks/microsoft", content=b"z" * (settings.max_webhook_bytes + 1)
        )
        webhook_streamed = await client.post(
            f"/webhooks/google?token={settings.push_token}",
            content=chunks(settings.max_webhook_bytes),
        )
        small = await client.post("/webhooks/microsoft", json={"value": []})
    for response in (declared, streamed, webhook, webhook_streamed):
        assert response.status_code == 413, response.text
        assert error_codes(response.json()) == ["REQUEST_TOO_LARGE"]
    assert small.status_code == 202
