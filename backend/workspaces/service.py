from __future__ import annotations

import secrets

from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth import queries
from backend.auth.service import Viewer
from backend.auth.tables import ContactAutoCreation, ContactMatching, Role, User, Workspace
from backend.kit.addresses import validate_address
from backend.kit.errors import ErrorCode, Forbidden, ServiceError
from backend.kit.text import clean_name

UNSET = object()


def capture_address(workspace: Workspace, capture_domain: str) -> str:
    return f"{workspace.capture_key}@{capture_domain}"


def new_capture_key() -> str:
    """R16: an unguessable local part (80 random bits)."""
    return f"capture-{secrets.token_hex(10)}"


async def rotate_capture_address(session: AsyncSession, viewer: Viewer) -> Workspace:
    """R16: a new capture address; the old one stops working at once."""
    if not viewer.is_admin:
        raise Forbidden("Only workspace owners and admins can rotate the capture address.")
    workspace = await session.get(Workspace, viewer.workspace_id)
    if workspace is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "Workspace not found.")
    workspace.capture_key = new_capture_key()
    session.add(workspace)
    await session.flush()
    return workspace


async def create_workspace(
    session: AsyncSession, name: str, owner_email: str, owner_name: str | None = None
) -> tuple[Workspace, User]:
    checked = clean_name(name, ["name"], what="workspace name", required=True)
    workspace = Workspace(name=checked or "", capture_key=new_capture_key())
    session.add(workspace)
    await session.flush()
    owner = await add_user(session, workspace, owner_email, Role.OWNER, owner_name)
    return workspace, owner


async def add_user(
    session: AsyncSession, workspace: Workspace, email: str, role: Role, name: str | None = None
) -> User:
    address = validate_address(email, ["email"])
    if await queries.user_by_email(session, address) is not None:
        raise ServiceError(
            ErrorCode.DUPLICATE_USER,
            f"A user with the address {address} already exists.",
            ["email"],
        )
    user = User(
        workspace_id=workspace.id,
        email=address,
        name=clean_name(name, ["name"]) or address.split("@")[0],
        role=role,
    )
    session.add(user)
    await session.flush()
    return user


async def update_settings(
    session: AsyncSession,
    viewer: Viewer,
    *,
    contact_matching: ContactMatching | None,
    contact_auto_creation: ContactAutoCreation | None,
    mailbox_limit: object = UNSET,
    label_synced_mail: bool | None = None,
) -> Workspace:
    if not viewer.is_admin:
        raise Forbidden("Only workspace owners and admins can change settings.")
    workspace = await session.get(Workspace, viewer.workspace_id)
    if workspace is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "Workspace not found.")
    if mailbox_limit is not UNSET:
        if mailbox_limit is not None and (not isinstance(mailbox_limit, int) or mailbox_limit < 0):
            raise ServiceError(
                ErrorCode.INVALID_LIMIT,
                "The mailbox limit must be zero or more (null for unlimited).",
                ["mailboxLimit"],
            )
        workspace.mailbox_limit = mailbox_limit if isinstance(mailbox_limit, int) else None
    if contact_matching is not None:
        workspace.contact_matching = contact_matching
    if contact_auto_creation is not None:
        workspace.contact_auto_creation = contact_auto_creation
    if label_synced_mail is not None:
        workspace.label_synced_mail = label_synced_mail
    session.add(workspace)
    await session.flush()
    return workspace
