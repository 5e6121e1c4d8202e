"""How much of an email a viewer may see (R17), decided here for every entry point."""

from __future__ import annotations

import enum
import uuid
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlmodel import col, select

from backend.mail.tables import Email
from backend.mailboxes.tables import EmailVisibility, Mailbox

if TYPE_CHECKING:
    from backend.auth.service import Viewer


class Access(enum.IntEnum):
    """How much of an email the viewer may see (R17)."""

    METADATA = 0
    SUBJECT = 1
    ALL = 2


_ACCESS_BY_VISIBILITY = {
    EmailVisibility.SHARE_EVERYTHING: Access.ALL,
    EmailVisibility.SUBJECT_ONLY: Access.SUBJECT,
    EmailVisibility.METADATA_ONLY: Access.METADATA,
}


def access_for(viewer: Viewer | None, visibility: str | None, owner_id: uuid.UUID | None) -> Access:
    """The mailbox owner sees all of their mail; colleagues what its visibility shares."""
    if visibility is None or (viewer is not None and owner_id == viewer.user.id):
        return Access.ALL
    return _ACCESS_BY_VISIBILITY[EmailVisibility(visibility)]


def readable_by(viewer_id: uuid.UUID | None, at_least: Access) -> sa.ColumnElement[bool]:
    """`access_for` as SQL: the emails of which the viewer may see at least `at_least`, so
    that searching and filtering reveal nothing that reading would not (R17)."""
    shared = [v for v, access in _ACCESS_BY_VISIBILITY.items() if access >= at_least]
    mailboxes = select(Mailbox.id).where(
        sa.or_(col(Mailbox.visibility).in_(shared), col(Mailbox.owner_id) == viewer_id)
    )
    return sa.or_(col(Email.mailbox_id).is_(None), col(Email.mailbox_id).in_(mailboxes))
