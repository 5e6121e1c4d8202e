"""The one way captured mail comes in, whichever door it used (SMTP or HTTP): look up the
capture address, file the message in a unit of work of its own, count refusals.

Anything raised other than `CaptureRefused` is transient (the database or Redis is away):
the entry points answer so that the sender retries (SMTP 451, HTTP 503), and nothing is lost;
a retry files nothing twice (R7)."""

from __future__ import annotations

import logging
import uuid

from backend.auth.tables import Workspace
from backend.capture.service import (
    CaptureRefused,
    CaptureResult,
    capture_message,
    workspace_for_address,
)
from backend.runtime import Runtime

log = logging.getLogger(__name__)


def refused_key(workspace_id: uuid.UUID) -> str:
    """Redis counter of the messages refused for a workspace (senders who are not users)."""
    return f"mailsync:capture:refused:{workspace_id}"


async def known_recipient(runtime: Runtime, address: str) -> uuid.UUID | None:
    """The workspace whose capture address this is; None for any other address."""
    async with runtime.db.sessionmaker() as session:
        workspace = await workspace_for_address(session, address, runtime.settings.capture_domain)
        return workspace.id if workspace is not None else None


async def deliver(runtime: Runtime, address: str, raw: bytes) -> CaptureResult:
    """File `raw` for the workspace of capture address `address`; commits before returning."""
    workspace_id: uuid.UUID | None = None
    try:
        async with runtime.unit_of_work() as work:
            workspace: Workspace | None = await workspace_for_address(
                work.session, address, runtime.settings.capture_domain
            )
            if workspace is None:  # rotated between RCPT and DATA
                raise CaptureRefused("no such capture address")
            workspace_id = workspace.id
            result = await capture_message(
                work.session, work.effects, workspace, raw, runtime.settings.capture_domain
            )
    except CaptureRefused as exc:
        log.info("capture refused for %s: %s", address, exc.reason)
        if workspace_id is not None:
            await _count_refusal(runtime, workspace_id)
        raise
    log.info("captured for workspace %s: %s %s", workspace_id, result.status, result.reason or "")
    return result


async def _count_refusal(runtime: Runtime, workspace_id: uuid.UUID) -> None:
    try:
        await runtime.redis.incr(refused_key(workspace_id))
    except Exception:  # a lost count must not turn a refusal into a retry
        log.warning("could not count a capture refusal", exc_info=True)


async def refusals(runtime: Runtime, workspace_id: uuid.UUID) -> int:
    value = await runtime.redis.get(refused_key(workspace_id))
    return int(value) if value else 0
