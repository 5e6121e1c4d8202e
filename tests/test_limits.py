"""Abuse limits and error masking."""

from __future__ import annotations

import pytest

from backend.settings import Settings
from tests.client import GQL
from tests.factories import Factory


async def test_query_depth_is_limited(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    deep = "{ contacts { edges { node { timeline { edges { node { thread { emails { edges { node { thread { emails { edges { node { id } } } } } } } } } } } } } } }"
    body = await gql.raw(deep, token=owner.token)
    assert body["data"] is None
    assert "exceeds maximum operation depth" in body["errors"][0]["message"]


async def test_aliases_are_limited(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    many = "{ " + " ".join(f"a{i}: viewer {{ user {{ id }} }}" for i in range(40)) + " }"
    body = await gql.raw(many, token=owner.token)
    assert body["data"] is None
    assert "aliases" in body["errors"][0]["message"].lower()


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
    assert Settings(env="development", _env_file=None).secret  # type: ignore[call-arg]


def test_a_graph_subscription_lifetime_must_outlast_the_daily_renewal() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1500"):
        Settings(microsoft_subscription_minutes=60, _env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="less than or equal to 10080"):
        Settings(microsoft_subscription_minutes=20000, _env_file=None)  # type: ignore[call-arg]
    assert Settings(_env_file=None).microsoft_subscription_minutes == 4200  # type: ignore[call-arg]
