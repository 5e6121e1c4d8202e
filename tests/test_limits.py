"""Abuse limits and error masking."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from backend.runtime import Work
from backend.settings import Settings
from tests.client import GQL
from tests.conftest import LiveServer
from tests.factories import Factory


async def test_query_depth_is_limited(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    deep = "{ contacts { edges { node { timeline { edges { node { thread { emails { edges { node { thread { emails { edges { node { id } } } } } } } } } } } } } } }"
    body = await gql.raw(deep, token=owner.token)
    assert body["data"] is None
    assert "exceeds maximum operation depth" in body["errors"][0]["message"]
    assert body["errors"][0]["extensions"] == {"code": "QUERY_TOO_DEEP"}


async def test_aliases_are_limited(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    many = "{ " + " ".join(f"a{i}: viewer {{ user {{ id }} }}" for i in range(40)) + " }"
    body = await gql.raw(many, token=owner.token)
    assert body["data"] is None
    assert "aliases" in body["errors"][0]["message"].lower()
    assert body["errors"][0]["extensions"] == {"code": "TOO_MANY_ALIASES"}


async def test_unexpected_errors_are_masked_and_logged(
    gql: GQL, factory: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend.contacts import queries

    async def broken(*args: object) -> int:
        raise RuntimeError("connection string postgres://secret@db")

    owner = await factory.workspace()
    monkeypatch.setattr(queries, "count_contacts", broken)
    with caplog.at_level("ERROR"):
        body = await gql.raw(
            "{ viewer { user { email } } contacts { totalCount } }", token=owner.token
        )
    assert body["data"] is None  # contacts is non-null, so the error propagates to the root
    assert [e["message"] for e in body["errors"]] == ["Unexpected error."]
    assert "secret" not in str(body)
    assert "postgres://secret@db" in caplog.text  # operators still see what happened


async def test_expected_query_errors_keep_their_code(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    failing = await gql.raw('{ contacts(after: "%%%") { totalCount } }', token=owner.token)
    assert failing["errors"][0]["extensions"] == {"code": "INVALID_CURSOR", "field": ["after"]}


def test_secret_key_is_required_outside_development() -> None:
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Settings(env="production", secret_key=None, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Settings(env="production", secret_key="changeme", _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="at least 32"):
        Settings(env="production", secret_key="short-but-not-a-placeholder", _env_file=None)  # type: ignore[call-arg]
    assert Settings(env="test", secret_key="x" * 40, _env_file=None).secret == b"x" * 40  # type: ignore[call-arg]
    # The test environment's 1 s send confirmation is refused outside tests: set it here.
    development = Settings(env="development", send_confirm_seconds=300, _env_file=None)  # type: ignore[call-arg]
    assert development.secret


def test_a_graph_subscription_lifetime_must_outlast_the_daily_renewal() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1500"):
        Settings(microsoft_subscription_minutes=60, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="less than or equal to 10080"):
        Settings(microsoft_subscription_minutes=20000, _env_file=None)  # type: ignore[call-arg]
    assert Settings(_env_file=None).microsoft_subscription_minutes == 4200  # type: ignore[call-arg]


ACTIVITY = "{ viewer { user { mailboxes { activity(days: %d) { queued } } } } }"


async def test_an_error_in_the_rollback_is_masked(
    api: LiveServer, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit of work ends after every other extension, MaskErrors included: what fails in
    its rollback must not reach the client either (it once did: a driver's
    'Cannot operate on a closed database.')."""
    member = await factory.workspace()
    await factory.mailbox(member)
    runtime = api.app.state.runtime
    real = runtime.unit_of_work

    @asynccontextmanager
    async def failing_rollback() -> AsyncIterator[Work]:
        async with real() as work:
            yield work
        raise RuntimeError("Cannot operate on a closed database.")

    monkeypatch.setattr(runtime, "unit_of_work", failing_rollback)
    body = await GQL(api.url).raw(ACTIVITY % 7, token=member.token)
    assert "closed database" not in json.dumps(body)
    assert [e["message"] for e in body["errors"]] == ["Unexpected error."]


@pytest.mark.parametrize("days", [318840595, 0, -1, 3651])
async def test_activity_days_out_of_range_is_a_coded_error(
    gql: GQL, factory: Factory, days: int
) -> None:
    member = await factory.workspace()
    await factory.mailbox(member)
    errors = (await gql.raw(ACTIVITY % days, token=member.token))["errors"]
    assert [(e["message"], e["extensions"]["code"]) for e in errors] == [
        ("`days` must be between 1 and 3650.", "INVALID_ARGUMENT")
    ]
    within = await gql.raw(ACTIVITY % 3650, token=member.token)
    assert within == {"data": {"viewer": {"user": {"mailboxes": [{"activity": {"queued": 0}}]}}}}
