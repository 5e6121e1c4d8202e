"""Bearer tokens: signed, expiring, revocable; UNAUTHENTICATED and FORBIDDEN errors."""

from __future__ import annotations

from datetime import timedelta

import pytest

from backend.auth.service import revoke_token
from backend.auth.tables import Role
from backend.auth.tokens import decode_token
from backend.graphql.relay import to_global_id
from backend.kit import clock
from backend.runtime import Runtime
from tests.client import GQL, GraphQLFailed, error_codes, ws_connect
from tests.conftest import LiveServer
from tests.factories import Factory

VIEWER = "{ viewer { user { email role } } }"


async def test_valid_token_sees_its_user(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    data = await gql(VIEWER, token=owner.token)
    assert data["viewer"]["user"] == {"email": owner.email, "role": "OWNER"}


@pytest.mark.parametrize("token", [None, "garbage", "ms1.e30.AAAA"])
async def test_missing_or_invalid_token_is_unauthenticated(gql: GQL, token: str | None) -> None:
    body = await gql.raw(VIEWER, token=token)
    assert body["data"] is None
    assert error_codes(body) == ["UNAUTHENTICATED"]


async def test_tampered_token_is_rejected(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    prefix, payload, signature = owner.token.split(".")
    forged = f"{prefix}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    assert error_codes(await gql.raw(VIEWER, token=forged)) == ["UNAUTHENTICATED"]


async def test_expired_token_is_rejected(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    assert (await gql(VIEWER, token=owner.token))["viewer"]
    clock.advance(timedelta(hours=2))  # factory tokens live one hour
    assert error_codes(await gql.raw(VIEWER, token=owner.token)) == ["UNAUTHENTICATED"]


async def test_revoked_token_is_rejected_at_once(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    claims = decode_token(runtime.settings.secret, owner.token)
    assert claims is not None
    async with runtime.db.transaction() as session:
        assert await revoke_token(session, claims.token_id)
    assert error_codes(await gql.raw(VIEWER, token=owner.token)) == ["UNAUTHENTICATED"]


async def test_role_failures_are_forbidden(gql: GQL, factory: Factory) -> None:
    owner = await factory.workspace()
    user = await factory.member(owner, Role.USER)
    body = await gql.raw("{ connectionStatuses { health } }", token=user.token)
    assert error_codes(body) == ["FORBIDDEN"]
    body = await gql.raw(
        "mutation { updateWorkspaceSettings(input: {mailboxLimit: 3}) { settings { mailboxLimit } } }",
        token=user.token,
    )
    assert error_codes(body) == ["FORBIDDEN"]
    admin = await factory.member(owner, Role.ADMIN)
    data = await gql(
        "mutation { updateWorkspaceSettings(input: {mailboxLimit: 3}) { settings { mailboxLimit } "
        "workspace { id settings { mailboxLimit } } } }",
        token=admin.token,
    )
    assert data["updateWorkspaceSettings"]["settings"] == {"mailboxLimit": 3}
    # The Workspace with its id, so a normalized cache (Apollo, Relay) updates its copy.
    assert data["updateWorkspaceSettings"]["workspace"] == {
        "id": to_global_id("Workspace", owner.workspace.id),
        "settings": {"mailboxLimit": 3},
    }


async def test_websocket_without_a_valid_token_is_refused(api: LiveServer) -> None:
    with pytest.raises((GraphQLFailed, Exception)) as refused:
        async with ws_connect(api.ws_url, "not-a-token"):
            pass
    assert "4403" in str(refused.value) or "UNAUTHENTICATED" in str(refused.value)


async def test_websocket_with_token_answers_queries(api: LiveServer, factory: Factory) -> None:
    from tests.client import start

    owner = await factory.workspace()
    async with ws_connect(api.ws_url, owner.token) as (ws, protocol):
        result = await (await start(ws, protocol, "q1", VIEWER)).next()
    assert result["data"]["viewer"]["user"]["email"] == owner.email
