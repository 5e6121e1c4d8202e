from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.tables import ApiToken, User, Workspace
from backend.auth.tokens import TokenClaims, decode_token, encode_token
from backend.kit.clock import now


@dataclass(frozen=True)
class Viewer:
    """Who is asking: the user and the workspace every query is confined to."""

    user: User
    workspace: Workspace
    token_id: uuid.UUID | None = None

    @property
    def workspace_id(self) -> uuid.UUID:
        return self.workspace.id

    @property
    def is_admin(self) -> bool:
        return self.user.role in {"OWNER", "ADMIN"}


async def issue_token(session: AsyncSession, secret: bytes, user: User, ttl: timedelta) -> str:
    row = ApiToken(user_id=user.id, expires_at=now() + ttl)
    session.add(row)
    await session.flush()
    return encode_token(secret, TokenClaims(row.id, user.id, row.expires_at))


async def revoke_token(session: AsyncSession, token_id: uuid.UUID) -> bool:
    result = await session.execute(
        update(ApiToken)
        .where(col(ApiToken.id) == token_id, col(ApiToken.revoked_at).is_(None))
        .values(revoked_at=now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def authenticate(session: AsyncSession, secret: bytes, token: str | None) -> Viewer | None:
    """The viewer a bearer token stands for, or None if it is forged, expired or revoked."""
    if not token:
        return None
    claims = decode_token(secret, token)
    if claims is None or claims.expires_at <= now():
        return None
    row = (
        await session.execute(
            select(ApiToken, User, Workspace)
            .join(User, User.id == ApiToken.user_id)  # type: ignore[arg-type]
            .join(Workspace, Workspace.id == User.workspace_id)  # type: ignore[arg-type]
            .where(ApiToken.id == claims.token_id, ApiToken.user_id == claims.user_id)
        )
    ).one_or_none()
    if row is None:
        return None
    api_token, user, workspace = row
    if api_token.revoked_at is not None or api_token.expires_at <= now():
        return None
    return Viewer(user=user, workspace=workspace, token_id=api_token.id)
