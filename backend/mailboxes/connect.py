"""Connecting a mailbox through OAuth: the consent URL, then the callback that files it in.

The user's browser carries a signed `state` from `begin` to `finish`, binding the answer
to the user who asked (and, for a reconnect, to the mailbox).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.service import Viewer
from backend.auth.tables import User, Workspace
from backend.kit.addresses import validate_address
from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, ServiceError
from backend.kit.signing import sign, unsign
from backend.mailboxes import access, service
from backend.mailboxes.tables import Mailbox, MailboxStatus, SyncMode
from backend.providers.base import Provider, ProviderError
from backend.providers.oauth import ConnectedAccount, connector_for
from backend.settings import Settings

STATE_PURPOSE = "oauth-state"
STATE_TTL_SECONDS = 15 * 60


def begin(
    settings: Settings,
    viewer: Viewer,
    provider: Provider,
    *,
    login_hint: str | None = None,
    sync_mode: SyncMode = SyncMode.TWO_WAY,
    mailbox: Mailbox | None = None,
) -> str:
    """The authorization URL to send the user's browser to."""
    if provider == Provider.IMAP:
        raise ServiceError(
            ErrorCode.UNSUPPORTED_PROVIDER,
            "IMAP mailboxes connect with a password: use connectImapMailbox.",
            ["provider"],
        )
    connector = connector_for(provider)
    if connector is None:
        raise ServiceError(
            ErrorCode.NOT_IMPLEMENTED,
            f"Connecting a {provider.value} mailbox is not available in this version yet.",
            ["provider"],
        )
    hint = login_hint.strip() if login_hint else None
    if hint:
        hint = validate_address(hint, ["loginHint"])
    state = sign(
        settings.secret,
        STATE_PURPOSE,
        {
            "u": str(viewer.user.id),
            "p": provider.value,
            "s": sync_mode.value,
            "m": str(mailbox.id) if mailbox else None,
        },
        STATE_TTL_SECONDS,
    )
    return connector.authorization_url(
        settings, state, hint or (mailbox.email_address if mailbox else None)
    )


async def begin_reconnect(
    session: AsyncSession, settings: Settings, viewer: Viewer, mailbox_id: uuid.UUID | None
) -> str:
    mailbox = await service.get_managed(session, viewer, mailbox_id)
    return begin(settings, viewer, mailbox.provider, sync_mode=mailbox.sync_mode, mailbox=mailbox)


async def finish(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    provider: Provider,
    code: str,
    state: str,
) -> Mailbox:
    """Exchange the code, then connect a new mailbox or refresh the one being reconnected."""
    claims = unsign(settings.secret, STATE_PURPOSE, state)
    if claims is None or claims.get("p") != provider.value:
        raise ServiceError(
            ErrorCode.INVALID_STATE,
            "This sign-in link expired or was not issued by mailsync; try again.",
        )
    user = await session.get(User, uuid.UUID(str(claims["u"])))
    workspace = await session.get(Workspace, user.workspace_id) if user else None
    if user is None or workspace is None:
        raise ServiceError(
            ErrorCode.INVALID_STATE, "The user who started this sign-in no longer exists."
        )
    viewer = Viewer(user=user, workspace=workspace)
    connector = connector_for(provider)
    if connector is None:
        raise ServiceError(ErrorCode.NOT_IMPLEMENTED, f"{provider.value} is not available.")
    try:
        account = await connector.complete(settings, code)
    except ProviderError as exc:
        raise ServiceError(
            ErrorCode.__members__.get(exc.code.value, ErrorCode.PROVIDER_ERROR),
            f"The provider refused the connection: {exc.detail}",
        ) from exc
    target_id = claims.get("m")
    target = None
    if target_id:
        target = await service.get_managed(session, viewer, uuid.UUID(str(target_id)))
    else:
        target = await _same_account(
            session, viewer, provider, account.email_address
        ) or await _disconnected_account(session, user, provider, account.email_address)
    if target is not None:
        return await _reconnect(session, effects, settings, viewer, target, account)
    mailbox = await service.connect_mailbox(
        session,
        effects,
        settings.secret,
        owner=user,
        provider=provider,
        email_address=account.email_address,
        credentials=account.credentials,
        aliases=account.aliases,
        sync_mode=SyncMode(str(claims.get("s") or SyncMode.TWO_WAY.value)),
    )
    mailbox.cursor = account.cursor
    session.add(mailbox)
    await session.flush()
    return mailbox


async def _same_account(
    session: AsyncSession, viewer: Viewer, provider: Provider, address: str
) -> Mailbox | None:
    """Connecting an address the user already has connected refreshes that mailbox."""
    existing = (
        await session.scalars(
            select(Mailbox).where(
                Mailbox.workspace_id == viewer.workspace_id,
                Mailbox.provider == provider,
                Mailbox.email_address == address,
                Mailbox.status != MailboxStatus.DISCONNECTED,
            )
        )
    ).first()
    if existing is not None and not access.can_manage(viewer, existing):
        raise ServiceError(
            ErrorCode.ALREADY_CONNECTED,
            f"{address} is already connected by another user.",
            ["emailAddress"],
        )
    return existing


async def _disconnected_account(
    session: AsyncSession, user: User, provider: Provider, address: str
) -> Mailbox | None:
    """R6: the user's own mailbox of this account that was disconnected, resumed with its
    id, cursor and history rather than replaced by a second mailbox starting from now."""
    return (
        await session.scalars(
            select(Mailbox)
            .where(
                Mailbox.workspace_id == user.workspace_id,
                Mailbox.owner_id == user.id,
                Mailbox.provider == provider,
                Mailbox.email_address == address,
                Mailbox.status == MailboxStatus.DISCONNECTED,
            )
            .order_by(col(Mailbox.connected_at).desc())
        )
    ).first()


async def _reconnect(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    viewer: Viewer,
    mailbox: Mailbox,
    account: ConnectedAccount,
) -> Mailbox:
    """Same account: resume from the cursor (R6). Another address: start from its position,
    keeping everything filed so far."""
    if account.email_address != mailbox.email_address:
        clash = await _same_account(session, viewer, mailbox.provider, account.email_address)
        if clash is not None and clash.id != mailbox.id:
            raise ServiceError(
                ErrorCode.ALREADY_CONNECTED,
                f"{account.email_address} is already connected.",
                ["emailAddress"],
            )
        mailbox.email_address = account.email_address
        mailbox.cursor = account.cursor
    elif mailbox.cursor is None:
        mailbox.cursor = account.cursor
    mailbox.aliases = account.aliases
    service.write_credentials(settings.secret, mailbox, account.credentials)
    await service.revive(session, effects, mailbox)
    return mailbox


def redirect_params(result: Mailbox | ServiceError, global_id: Any) -> dict[str, str]:
    if isinstance(result, ServiceError):
        return {"error": result.code, "message": result.message}
    return {"mailboxId": str(global_id), "status": result.status.value}
