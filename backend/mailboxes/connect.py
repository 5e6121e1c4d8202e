"""Connecting a mailbox through OAuth: the consent URL, then the callback that files it in.

The user's browser carries a signed `state` from `begin` to `finish`, binding the answer
to the user who asked (and, for a reconnect, to the mailbox).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from backend.auth.service import Viewer
from backend.auth.tables import User, Workspace
from backend.kit.addresses import normalize_address, validate_address
from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, ServiceError, in_range
from backend.kit.signing import sign, unsign
from backend.mailboxes import access, service
from backend.mailboxes.tables import Mailbox, MailboxStatus, SyncMode
from backend.providers.base import Provider, ProviderError
from backend.providers.imap.client import (
    ImapConfig,
    close_imap,
    close_smtp,
    open_imap,
    open_smtp,
)
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
        # What the old account's passes left undone names its messages, not the new one's
        # (a disconnect keeps it for R6). sync_backlog belongs to the sync layer, above this
        # one: named, not imported.
        from sqlalchemy import Uuid, column, delete, table

        backlog = table("sync_backlog", column("mailbox_id", Uuid()))
        await session.execute(delete(backlog).where(backlog.c.mailbox_id == mailbox.id))
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


# --- IMAP/SMTP: a password instead of a consent screen ------------------------------------

# Providers that refuse the account password over IMAP and want an app password instead:
# the hint names the one whose host or address the user gave.
APP_PASSWORD_PROVIDERS = (
    (("gmail.com", "googlemail.com"), "Gmail", "a Google app password (2-Step Verification)"),
    (
        ("outlook.com", "office365.com", "hotmail.com", "live.com"),
        "Outlook.com",
        "a Microsoft app password (advanced security options)",
    ),
    (("yahoo.com", "yahoo.co.uk", "ymail.com"), "Yahoo", "a Yahoo app password"),
    (("icloud.com", "me.com", "mac.com"), "iCloud", "an app-specific password for iCloud"),
    (("zoho.com", "zoho.eu", "zoho.in"), "Zoho", "a Zoho application-specific password"),
    (("fastmail.com", "messagingengine.com"), "Fastmail", "a Fastmail app password"),
)
SECURITIES = ("TLS", "STARTTLS", "NONE")


@dataclass(frozen=True)
class ImapInput:
    email_address: str
    password: str
    imap_host: str
    smtp_host: str
    imap_port: int = 993
    smtp_port: int = 465
    username: str | None = None
    security: str = "TLS"
    sync_mode: SyncMode = SyncMode.TWO_WAY
    # The other addresses the user sends and receives as (R1, R8); None keeps a reconnected
    # mailbox's, since IMAP has no standard way to list them.
    identities: Sequence[str] | None = None


# An address list, not a mailing list: enough for a person's aliases, small enough that the
# own-address cache stays cheap.
MAX_IDENTITIES = 50


@dataclass(frozen=True)
class ProbedImap:
    """Settings both servers accepted, ready to store: the result of `probe_imap_input`."""

    account: ConnectedAccount
    identities: list[str] | None
    sync_mode: SyncMode


def app_password_hint(*names: str) -> str:
    for name in names:
        name = name.lower().strip().rstrip(".")
        for domains, label, what in APP_PASSWORD_PROVIDERS:
            if any(name == d or name.endswith("." + d) or name.endswith("@" + d) for d in domains):
                return f" {label} accepts only {what} here, not the account's password."
    return " If the provider asks for an app password for mail programs, use one."


def _not_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def _check_host(settings: Settings, host: str, port: int, field: str, security: str) -> None:
    in_range(field.replace("Host", "Port"), port, 1, 65535)
    if not host or len(host) > 253 or any(c.isspace() or c in "/@" for c in host):
        raise ServiceError(ErrorCode.INVALID_DOMAIN, f"{host!r} is not a host name.", [field])
    addresses = await _resolve(host, port)
    if security == "NONE" and not (addresses and all(a.is_loopback for a in addresses)):
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            "security NONE sends the password in clear: it is allowed only for loopback hosts.",
            ["security"],
        )
    if not addresses:
        raise ServiceError(
            ErrorCode.HOST_UNREACHABLE, f"{host} does not resolve to any address.", [field]
        )
    if (
        settings.env == "production"
        and not settings.imap_allow_private_hosts
        and any(_not_public(a) for a in addresses)
    ):
        raise ServiceError(
            ErrorCode.HOST_NOT_ALLOWED,
            f"{host} resolves to a private, loopback or link-local address, "
            "which this server does not connect to.",
            [field],
        )


def _connect_error(exc: ProviderError, config: ImapConfig, smtp: bool) -> ServiceError:
    field = "smtpHost" if smtp else "imapHost"
    code = getattr(exc, "connect_code", None)
    if code == "AUTH_FAILED":
        return ServiceError(
            ErrorCode.AUTH_FAILED,
            f"The {'SMTP' if smtp else 'IMAP'} server refused the user name or password."
            + app_password_hint(config.imap_host, config.smtp_host, config.email_address),
            ["password"],
        )
    if code in ("HOST_UNREACHABLE", "TLS_FAILED", "NOT_IMAP"):
        return ServiceError(ErrorCode[code], exc.detail, [field])
    return ServiceError(ErrorCode.PROVIDER_ERROR, exc.detail, [field])


async def probe_imap(config: ImapConfig, settings: Settings) -> None:
    """Log in to IMAP and SMTP with `config`, or the user error that says what is wrong."""
    try:
        imap = await open_imap(config, settings.imap_ca_file)
    except ProviderError as exc:
        raise _connect_error(exc, config, smtp=False) from exc
    await close_imap(imap)
    try:
        smtp = await open_smtp(config, settings.imap_ca_file)
    except ProviderError as exc:
        raise _connect_error(exc, config, smtp=True) from exc
    await close_smtp(smtp)


def _identities(given: Sequence[str] | None, address: str) -> list[str] | None:
    if given is None:
        return None
    if len(given) > MAX_IDENTITIES:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            f"At most {MAX_IDENTITIES} identities per mailbox.",
            ["identities"],
        )
    found: list[str] = []
    for index, value in enumerate(given):
        identity = normalize_address(validate_address(value.strip(), ["identities", str(index)]))
        if identity != normalize_address(address) and identity not in found:
            found.append(identity)
    return found


async def probe_imap_input(settings: Settings, given: ImapInput) -> ProbedImap:
    """Check `given` and log in to both servers, touching no database: the logins against a
    user-chosen host can take tens of seconds, which must not be spent holding SQLite's write
    lock (every other writer would wait on it)."""
    address = validate_address(given.email_address.strip(), ["emailAddress"])
    security = (given.security or "TLS").upper()
    if security not in SECURITIES:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT, "security must be TLS, STARTTLS or NONE.", ["security"]
        )
    if not given.password:
        raise ServiceError(ErrorCode.AUTH_FAILED, "A password is required.", ["password"])
    identities = _identities(given.identities, address)
    imap_host, smtp_host = given.imap_host.strip().lower(), given.smtp_host.strip().lower()
    await _check_host(settings, imap_host, given.imap_port, "imapHost", security)
    await _check_host(settings, smtp_host, given.smtp_port, "smtpHost", security)
    config = ImapConfig(
        email_address=address,
        username=(given.username or "").strip() or address,
        password=given.password,
        imap_host=imap_host,
        imap_port=given.imap_port,
        smtp_host=smtp_host,
        smtp_port=given.smtp_port,
        security=security,
    )
    await probe_imap(config, settings)
    account = ConnectedAccount(
        email_address=address, credentials=config.credentials(), aliases=[], cursor=None
    )
    return ProbedImap(account=account, identities=identities, sync_mode=given.sync_mode)


async def store_imap(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    viewer: Viewer,
    probed: ProbedImap,
    *,
    mailbox: Mailbox | None = None,
) -> Mailbox:
    """Store settings `probe_imap_input` accepted: a new mailbox, or an existing one's new
    settings (R6: same history)."""
    address = probed.account.email_address
    if mailbox is None:
        mailbox = await _same_account(session, viewer, Provider.IMAP, address) or (
            await _disconnected_account(session, viewer.user, Provider.IMAP, address)
        )
    if mailbox is not None:
        # Identities the user declared earlier stay unless new ones were given.
        kept = list(mailbox.aliases) if probed.identities is None else probed.identities
        account = replace(
            probed.account, aliases=[a for a in kept if a != normalize_address(address)]
        )
        return await _reconnect(session, effects, settings, viewer, mailbox, account)
    return await service.connect_mailbox(
        session,
        effects,
        settings.secret,
        owner=viewer.user,
        provider=Provider.IMAP,
        email_address=address,
        credentials=probed.account.credentials,
        aliases=probed.identities or [],
        sync_mode=probed.sync_mode,
    )


async def connect_imap(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    viewer: Viewer,
    given: ImapInput,
    *,
    mailbox: Mailbox | None = None,
) -> Mailbox:
    """Connect an IMAP mailbox, or give an existing one new settings (R6: same history).
    Nothing is stored before both servers accepted the login."""
    probed = await probe_imap_input(settings, given)
    return await store_imap(session, effects, settings, viewer, probed, mailbox=mailbox)


async def imap_mailbox(
    session: AsyncSession, viewer: Viewer, mailbox_id: uuid.UUID | None
) -> Mailbox:
    """The IMAP mailbox `viewer` may give new settings to."""
    mailbox = await service.get_managed(session, viewer, mailbox_id)
    if mailbox.provider != Provider.IMAP:
        raise ServiceError(
            ErrorCode.UNSUPPORTED_PROVIDER,
            "Only IMAP mailboxes take settings; this one reconnects through its provider's "
            "consent screen.",
            ["imap"],
        )
    return mailbox


async def reconnect_imap(
    session: AsyncSession,
    effects: AfterCommit,
    settings: Settings,
    viewer: Viewer,
    mailbox_id: uuid.UUID | None,
    given: ImapInput,
) -> Mailbox:
    """`reconnectMailbox` with new IMAP settings: the same mailbox (R6), its history kept.
    The API checks access in a read-only session, probes, then stores in its own
    transaction (see `probe_imap_input`); this does the three in one, for other callers."""
    await imap_mailbox(session, viewer, mailbox_id)
    probed = await probe_imap_input(settings, given)
    mailbox = await imap_mailbox(session, viewer, mailbox_id)
    return await store_imap(session, effects, settings, viewer, probed, mailbox=mailbox)
