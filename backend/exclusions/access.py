"""Who sees and removes an exclusion (R4): anyone adds one; owners and admins see and remove
all of them, a USER only those they added."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.auth.service import Viewer
    from backend.exclusions.tables import Exclusion


def can_see(viewer: Viewer, exclusion: Exclusion) -> bool:
    return exclusion.workspace_id == viewer.workspace_id and (
        viewer.is_admin or exclusion.created_by_id == viewer.user.id
    )


def listed_creator(viewer: Viewer) -> uuid.UUID | None:
    """Whose exclusions a listing shows: the viewer's own, or (None) everyone's for admins."""
    return None if viewer.is_admin else viewer.user.id
