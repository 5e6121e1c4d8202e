"""Gmail push: Pub/Sub delivers `{emailAddress, historyId}`; we start a pass for that mailbox."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from backend.kit.addresses import normalize_address

log = logging.getLogger(__name__)


def parse_envelope(envelope: Any) -> tuple[str, int] | None:
    """(emailAddress, historyId) of a Pub/Sub push, or None when it is not one."""
    try:
        data = base64.urlsafe_b64decode(str(envelope["message"]["data"]) + "==")
        notice = json.loads(data)
        return normalize_address(str(notice["emailAddress"])), int(notice["historyId"])
    except (KeyError, TypeError, ValueError, binascii.Error):
        return None
