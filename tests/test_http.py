"""Health checks and the offline GraphiQL page."""

from __future__ import annotations

import re

import httpx

from backend import graphiql
from tests.conftest import LiveServer


async def test_healthz_and_readyz(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        assert (await client.get("/healthz")).text == "ok"
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert {k: body[k] for k in ("ready", "database", "redis")} == {
        "ready": True,
        "database": "ok",
        "redis": "ok",
    }
    assert body["subscribers"] == api.app.state.runtime.hub.subscriber_count


async def test_graphiql_is_served_without_any_cdn(api: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        page = await client.get("/graphql", headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert "GraphiQL" in page.text
        # Every script and stylesheet comes from this server.
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(s.startswith("/graphiql/static/") for s in sources)
        assert "unpkg" not in page.text and "cdn" not in page.text.lower()
        for source in sources:
            asset = await client.get(source)
            assert asset.status_code == 200, source
            assert len(asset.content) > 1000
        assert (await client.get("/graphiql/static/../../settings.py")).status_code == 404


def test_every_graphiql_asset_is_installed() -> None:
    assert graphiql.missing_assets() == []


async def test_graphiql_sends_the_bearer_token() -> None:
    page = graphiql.page()
    assert "Authorization" in page and "connectionParams" in page
