"""The SMTP receiver of capture addresses (`mailsync capture`), built on aiosmtpd.

- RCPT: only capture addresses of existing workspaces; any other recipient gets a 550, so
  the server is no open relay and a rotated address stops working at once.
- DATA: each recipient's workspace files the message; the answer comes after the commit.
  A refused sender gets a 550; an internal failure a 451, so the sending MTA retries.
- The size limit (`MAILSYNC_CAPTURE_MAX_BYTES`) is announced in EHLO (SIZE) and enforced by
  aiosmtpd with a 552.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from backend.capture import inbound
from backend.capture.service import CaptureRefused
from backend.runtime import Runtime

log = logging.getLogger(__name__)

TRY_LATER = "451 4.3.0 Temporary failure, please try again later"


class CaptureHandler:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        try:
            workspace_id = await inbound.known_recipient(self.runtime, address)
        except Exception:
            log.exception("capture: looking up a recipient failed")
            return TRY_LATER
        if workspace_id is None:
            return "550 5.1.1 No such capture address here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        refused: list[str] = []
        for address in envelope.rcpt_tos:
            try:
                await inbound.deliver(self.runtime, address, raw)
            except CaptureRefused as exc:
                refused.append(exc.reason)
            except Exception:
                # Whatever was filed for another recipient is committed; the retry finds it
                # stored (R7) and files only what is missing.
                log.exception("capture: filing a message failed")
                return TRY_LATER
        if refused and len(refused) == len(envelope.rcpt_tos):
            return f"550 5.7.1 Refused: {refused[0]}"
        return "250 2.0.0 OK: stored"


def smtp_factory(runtime: Runtime) -> SMTP:
    return SMTP(
        CaptureHandler(runtime),
        data_size_limit=runtime.settings.capture_max_bytes,
        hostname=runtime.settings.capture_domain,
        ident="mailsync capture",
        loop=asyncio.get_running_loop(),
    )


async def start_receiver(runtime: Runtime, host: str, port: int) -> asyncio.Server:
    """Listen on host:port in the running loop; close the returned server to stop."""
    loop = asyncio.get_running_loop()

    def protocol() -> Any:
        return smtp_factory(runtime)

    return await loop.create_server(protocol, host=host, port=port)
