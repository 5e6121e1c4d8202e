"""GraphQL over HTTP as the spec and SPA clients expect it: media types and status codes,
requests refused with a 4xx and a clear message, CORS and websocket origins, subscriptions
over plain HTTP (Apollo's multipart protocol)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from backend.graphql.relay import to_global_id
from backend.runtime import Runtime
from backend.settings import Settings
from tests.client import GQL, TRANSPORT_WS, WORK_TIMEOUT, SubscriberCount
from tests.conftest import LiveServer
from tests.factories import Factory, raw_message
from tests.sync_helpers import wait_until

SPA_DIR = Path(__file__).parent / "spa"


@pytest.mark.e2e  # runs node
async def test_every_graphql_http_audit_passes(api: LiveServer) -> None:
    node = shutil.which("node")
    assert node, "node is not installed (scripts/test installs it)"
    assert (SPA_DIR / "node_modules" / "graphql-http").is_dir(), "run npm ci in tests/spa"
    proc = await asyncio.create_subprocess_exec(
        node,
        "audit.mjs",
        f"{api.url}/graphql",
        cwd=SPA_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    results = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    not_ok = [r for r in results if r["status"] != "ok"]
    assert not_ok == [], json.dumps(not_ok, indent=2)
    assert len(results) == 61


GRAPHQL_RESPONSE = "application/graphql-response+json"


async def post(
    api: LiveServer,
    body: object,
    accept: str = "application/json",
    token: str | None = None,
) -> httpx.Response:
    headers = {"Accept": accept, "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=api.url, timeout=WORK_TIMEOUT) as client:
        return await client.post("/graphql", content=json.dumps(body), headers=headers)


def assert_refused(response: httpx.Response, words: str) -> None:
    """A 4xx whose GraphQL error says what was wrong, in words a client developer reads."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert "data" not in body, body
    message = " ".join(e["message"] for e in body["errors"])
    assert words in message, message


@pytest.mark.parametrize("accept", ["application/json", GRAPHQL_RESPONSE])
@pytest.mark.parametrize("body", [1, "{ __typename }", None, True])
async def test_a_body_that_is_not_an_object_is_a_400(
    api: LiveServer, body: object, accept: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        response = await post(api, body, accept)
    assert_refused(response, "must be a JSON object")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("accept", ["application/json", GRAPHQL_RESPONSE])
async def test_two_operations_without_an_operation_name_is_a_400(
    api: LiveServer, accept: str, caplog: pytest.LogCaptureFixture
) -> None:
    document = "query A { __typename } query B { __typename }"
    with caplog.at_level(logging.WARNING):
        response = await post(api, {"query": document}, accept)
        named = await post(api, {"query": document, "operationName": "B"}, accept)
    assert_refused(response, "operationName")
    assert named.status_code == 200 and named.json() == {"data": {"__typename": "Query"}}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("accept", ["application/json", GRAPHQL_RESPONSE])
async def test_a_subscription_over_plain_post_is_a_4xx_not_an_error_log(
    api: LiveServer, factory: Factory, accept: str, caplog: pytest.LogCaptureFixture
) -> None:
    member = await factory.workspace()
    with caplog.at_level(logging.WARNING):
        response = await post(
            api, {"query": "subscription { emailReceived { email { id } } }"}, accept, member.token
        )
    assert_refused(response, "subscription")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


SPA_ORIGIN = "http://127.0.0.1:5173"  # nothing listens there: only the Origin header matters
OTHER_ORIGIN = "http://evil.test"


@pytest.fixture(scope="module")
async def cors_api(settings: Settings, runtime: Runtime) -> AsyncIterator[LiveServer]:
    """An API that lets pages on SPA_ORIGIN call it (MAILSYNC_CORS_ORIGINS)."""
    server = LiveServer(settings.model_copy(update={"cors_origins": SPA_ORIGIN}))
    await server.start()
    yield server
    await server.stop()


async def test_a_preflight_from_an_allowed_origin_is_answered(cors_api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=cors_api.url, timeout=WORK_TIMEOUT) as client:
        preflight = await client.options(
            "/graphql",
            headers={
                "Origin": SPA_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == SPA_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed

        answer = await client.post(
            "/graphql", json={"query": "{ __typename }"}, headers={"Origin": SPA_ORIGIN}
        )
        assert answer.headers["access-control-allow-origin"] == SPA_ORIGIN
        assert answer.json() == {"data": {"__typename": "Query"}}

        refused = await client.options(
            "/graphql",
            headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers


async def test_without_allowed_origins_nothing_changes(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=WORK_TIMEOUT) as client:
        preflight = await client.options(
            "/graphql", headers={"Origin": SPA_ORIGIN, "Access-Control-Request-Method": "POST"}
        )
        answer = await client.post(
            "/graphql", json={"query": "{ __typename }"}, headers={"Origin": SPA_ORIGIN}
        )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in answer.headers


async def test_websocket_from_an_allowed_origin_is_accepted_and_from_another_refused(
    cors_api: LiveServer, factory: Factory
) -> None:
    member = await factory.workspace()
    async with websockets.connect(
        cors_api.ws_url,
        origin=Origin(SPA_ORIGIN),
        subprotocols=[Subprotocol(TRANSPORT_WS)],
        open_timeout=WORK_TIMEOUT,
    ) as ws:
        auth = {"Authorization": f"Bearer {member.token}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": auth}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), WORK_TIMEOUT))
        assert ack["type"] == "connection_ack"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            cors_api.ws_url,
            origin=Origin(OTHER_ORIGIN),
            subprotocols=[Subprotocol(TRANSPORT_WS)],
            open_timeout=WORK_TIMEOUT,
        ):
            pass
    assert refused.value.response.status_code == 403


MULTIPART = "multipart/mixed;subscriptionSpec=1.0,application/json"


async def test_a_multipart_subscription_receives_an_event(
    api: LiveServer, factory: Factory
) -> None:
    """Apollo's multipart subscriptions: one HTTP response, a part per event."""
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    ann = await factory.contact(owner, "ann@multipart.test", "Ann")
    subscribers = api.subscribers(owner.workspace.id)
    before = await subscribers()
    query = "subscription { emailReceived { email { subject } contacts { name } cursor } }"
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=WORK_TIMEOUT) as client,
        client.stream(
            "POST",
            "/graphql",
            json={"query": query},
            headers={"Accept": MULTIPART, "Authorization": f"Bearer {owner.token}"},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/mixed")
        await wait_until(lambda: _more(subscribers, before), WORK_TIMEOUT)
        await factory.ingest(
            mailbox, raw_message("Ann <ann@multipart.test>", [owner.email], "Over HTTP", "hi")
        )
        async with asyncio.timeout(WORK_TIMEOUT):
            payload = await _next_payload(response)
    event = payload["data"]["emailReceived"]
    assert event["email"] == {"subject": "Over HTTP"}
    assert event["contacts"] == [{"name": "Ann"}]
    timeline = await GQL(api.url)(
        "query($id: ID!) { contact(id: $id) { timeline { edges { cursor } } } }",
        {"id": to_global_id("Contact", ann.id)},
        token=owner.token,
    )
    assert event["cursor"] == timeline["contact"]["timeline"]["edges"][0]["cursor"]


async def test_a_multipart_subscription_needs_a_token(api: LiveServer) -> None:
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=WORK_TIMEOUT) as client,
        client.stream(
            "POST",
            "/graphql",
            json={"query": "subscription { emailReceived { email { id } } }"},
            headers={"Accept": MULTIPART},
        ) as response,
    ):
        async with asyncio.timeout(WORK_TIMEOUT):
            payload = await _next_payload(response)
    assert [e["extensions"]["code"] for e in payload["errors"]] == ["UNAUTHENTICATED"]


async def _more(count: SubscriberCount, than: int) -> bool:
    return await count() > than


async def _next_payload(response: httpx.Response) -> dict[str, Any]:
    """The next part carrying a payload (heartbeats are `{}`), or its transport error."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\r\n\r\n" in buffer:
            _, _, rest = buffer.partition("\r\n\r\n")
            body, sep, after = rest.partition("\r\n--graphql")
            if not sep:
                break
            buffer = after
            part = json.loads(body)
            if part.get("payload") is not None:
                payload: dict[str, Any] = part["payload"]
                return payload
            if part.get("errors"):
                return {"errors": part["errors"]}
    raise AssertionError(f"the stream ended without a payload: {buffer!r}")
