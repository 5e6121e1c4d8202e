"""How much of an email a viewer may see (R17), decided here for every entry point."""

from __future__ import annotations

import enum
import uuid
from typing import TYPE_CHECKING

from backend.mailboxes.tables import EmailVisibility

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
