"""Graph webhooks: change notifications and lifecycle events, each naming its mailbox
through the signed `clientState` the subscription was created with."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from backend.providers.microsoft.provider import mailbox_of_client_state
from backend.settings import Settings

log = logging.getLogger(__name__)

# The subscription is gone or about to lapse: the next pass renews or recreates it.
RESUBSCRIBE = {"reauthorizationRequired", "subscriptionRemoved"}


@dataclass
class Notices:
    mailbox_ids: set[uuid.UUID]
    resubscribe: set[uuid.UUID]
    rejected: int


def read_notices(settings: Settings, body: Any) -> Notices:
    notices = Notices(set(), set(), 0)
    items = body.get("value") if isinstance(body, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            notices.rejected += 1
            continue
        mailbox_id = mailbox_of_client_state(settings, item.get("clientState"))
        if mailbox_id is None:
            notices.rejected += 1
            continue
        try:
            parsed = uuid.UUID(mailbox_id)
        except ValueError:
            notices.rejected += 1
            continue
        notices.mailbox_ids.add(parsed)
        if item.get("lifecycleEvent") in RESUBSCRIBE:
            notices.resubscribe.add(parsed)
    return notices
