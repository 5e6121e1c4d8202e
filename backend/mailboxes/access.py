"""Who may see and manage a mailbox: its owner, and the workspace's owners and admins. Every
entry point (queries, node, subscriptions, an email's `mailbox`, services) asks here."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.auth.service import Viewer
    from backend.mailboxes.tables import Mailbox


def can_manage(viewer: Viewer, mailbox: Mailbox) -> bool:
    """See its status, errors and activity, sync, change or disconnect it."""
    return mailbox.workspace_id == viewer.workspace_id and (
        viewer.is_admin or mailbox.owner_id == viewer.user.id
    )


def can_list_mailboxes_of(viewer: Viewer, user_id: uuid.UUID) -> bool:
    return viewer.is_admin or viewer.user.id == user_id


def listed_owner(viewer: Viewer) -> uuid.UUID | None:
    """Whose mailboxes a listing shows: the viewer's own, or (None) everyone's for admins."""
    return None if viewer.is_admin else viewer.user.id
