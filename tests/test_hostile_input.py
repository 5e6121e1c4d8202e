"""Hostile requests: oversized bodies and documents, fragment bombs (issue 13)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from graphql import OperationDefinitionNode, parse

from backend.graphql.limits import DocumentCost
from backend.runtime import Runtime
from backend.settings import Settings
from tests.client import GQL, error_codes
from tests.conftest import LiveServer, free_port
from tests.factories import Factory


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


async def test_aliases_inside_introspection_count(api: LiveServer) -> None:
    many = "{ __schema { " + " ".join(f"t{i}: types {{ name }}" for i in range(40)) + " } }"
    response, _ = await post(api, many)
    assert error_codes(response.json()) == ["TOO_MANY_ALIASES"]
    deep = "{ __schema { types { fields { type { ofType { ofType { ofType { name } } } } } } } }"
    response, _ = await post(api, deep)
    assert "errors" not in response.json()


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


CREATE = """
mutation($input: CreateContactInput!) {
  createContact(input: $input) { contact { id name } userErrors { field code message } }
}
"""


async def post_json(api: LiveServer, body: object, token: str | None = None) -> httpx.Response:
    """JSON as a client escaping non-ASCII would send it (a lone surrogate as `\\ud800`)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        return await client.post("/graphql", content=json.dumps(body).encode(), headers=headers)


async def test_bad_text_never_reaches_the_database(api: LiveServer, factory: Factory) -> None:
    """PostgreSQL refused these inside the driver ("Unexpected error.")."""
    owner = await factory.workspace()
    cases = [
        ("x" * 201, "INVALID_NAME"),
        ("Ann\x00", "INVALID_TEXT"),
        ("Ann \ud800", "INVALID_TEXT"),
    ]
    for name, code in cases:
        payload = {"email": f"{uuid.uuid4().hex}@example.com", "name": name}
        response = await post_json(
            api, {"query": CREATE, "variables": {"input": payload}}, owner.token
        )
        result = response.json()["data"]["createContact"]
        assert result["contact"] is None
        assert [(e["field"], e["code"]) for e in result["userErrors"]] == [
            (["input", "name"], code)
        ], name
    fits = await post_json(
        api,
        {"query": CREATE, "variables": {"input": {"email": "ann@example.com", "name": "x" * 200}}},
        owner.token,
    )
    assert fits.json()["data"]["createContact"]["userErrors"] == []

    for search in ("\x00", "a\udfff"):
        for query in (
            "query($s: String) { contacts(search: $s) { totalCount } }",
            "query($s: String) { emails(filter: {search: $s}) { totalCount } }",
        ):
            body = (
                await post_json(api, {"query": query, "variables": {"s": search}}, owner.token)
            ).json()
            assert error_codes(body) == ["INVALID_TEXT"], (query, body)


async def test_like_wildcards_in_a_search_match_literally(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    for name, email in (
        ("100% real", "real@example.com"),
        ("plain", "plain@example.com"),
        ("snake_case", "snake@example.com"),
        ("snakeXcase", "other@example.com"),
    ):
        await gql(CREATE, {"input": {"email": email, "name": name}}, token=owner.token)
    search = "query($s: String) { contacts(search: $s) { edges { node { name } } } }"

    async def names(term: str) -> list[str]:
        data = await gql(search, {"s": term}, token=owner.token)
        return sorted(e["node"]["name"] for e in data["contacts"]["edges"])

    assert await names("%") == ["100% real"]
    assert await names("e_c") == ["snake_case"]
    assert await names("0% R") == ["100% real"]
    data = await gql(
        "query($s: String) { emails(filter: {search: $s}) { totalCount } }",
        {"s": "%"},
        token=owner.token,
    )
    assert data["emails"]["totalCount"] == 0


async def test_invalid_utf8_is_a_bad_request(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        for content_type in ("application/json", "application/graphql", "text/plain"):
            response = await client.post(
                "/graphql",
                content=b'{"query": "{ __typename \xff\xfe }"}',
                headers={"Content-Type": content_type},
            )
            assert response.status_code == 400, (content_type, response.text)
            assert error_codes(response.json()) == ["BAD_REQUEST"]
        webhook = await client.post("/webhooks/microsoft", content=b"\xff\xfe{")
    assert webhook.status_code == 202  # a malformed notification is ignored, not a 500


async def test_huge_inputs_are_not_echoed_back(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    huge = "x" * 1_000_000
    result = (await gql(CREATE, {"input": {"email": huge, "name": huge}}, token=owner.token))[
        "createContact"
    ]
    assert [e["code"] for e in result["userErrors"]] == ["INVALID_EMAIL"]
    assert len(json.dumps(result)) < 2000
    exclusion = await gql.raw(
        "mutation($v: String!) { addExclusion(input: {value: $v}) { userErrors { message } } }",
        {"v": huge + ".com"},
        token=owner.token,
    )
    assert len(json.dumps(exclusion)) < 2000


async def test_graphiql_and_introspection_are_off_in_production_by_default(
    settings: Settings, runtime: Runtime
) -> None:
    production = settings.model_copy(update={"env": "production"})
    assert not production.graphiql_enabled and not production.introspection_enabled
    assert settings.graphiql_enabled and settings.introspection_enabled  # test, development
    opted_in = production.model_copy(update={"graphiql": True, "introspection": True})
    for configured, enabled in ((production, False), (opted_in, True)):
        server = LiveServer(configured, free_port())
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                ide = await client.get("/graphql", headers={"Accept": "text/html"})
                asset = await client.get("/graphiql/static/graphiql.css")
                schema = await client.post(
                    "/graphql", json={"query": "{ __schema { queryType { name } } }"}
                )
                typename = await client.post("/graphql", json={"query": "{ __typename }"})
        finally:
            await server.stop()
        assert (ide.status_code == 200) is enabled
        assert (asset.status_code == 404) is not enabled
        assert ("errors" not in schema.json()) is enabled, schema.text
        assert typename.json() == {"data": {"__typename": "Query"}}


async def test_the_graph_validation_echo_is_short_and_not_sniffed(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        echoed = await client.post(
            "/webhooks/microsoft", params={"validationToken": "<script>alert(1)</script>"}
        )
        too_long = await client.post("/webhooks/microsoft", params={"validationToken": "x" * 5000})
    assert echoed.status_code == 200
    assert echoed.text == "<script>alert(1)</script>"
    assert echoed.headers["content-type"].startswith("text/plain")
    assert echoed.headers["x-content-type-options"] == "nosniff"
    assert too_long.status_code == 400 and "xxxx" not in too_long.text
