"""Push for IMAP mailboxes (R14): one IDLE connection per syncable IMAP mailbox, held on
asyncio by the worker process, enqueueing a pass when the server announces new mail.

Each watcher selects INBOX and IDLEs; IDLE is re-issued every `IMAP_IDLE_SECONDS` (RFC 2177:
servers may end an IDLE after 30 minutes), a lost connection is re-opened with exponential
backoff, and a server without IDLE is checked every `IMAP_POLL_SECONDS` instead. A pass is
enqueued after every (re)connection too, since mail may have arrived while it was down.
The Sent folder is not watched (one IDLE watches one folder): its mail comes with the next
pass, at the latest the periodic one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aioimaplib
from sqlmodel import select

from backend.mailboxes.service import read_credentials
from backend.mailboxes.tables import Mailbox
from backend.providers.base import Provider, ProviderError
from backend.providers.imap.client import ImapConfig, close_imap, open_imap
from backend.sync.service import SYNCABLE

if TYPE_CHECKING:
    from backend.runtime import Runtime

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0
LOST = [b"mailsync: connection lost"]


@dataclass
class Watcher:
    mailbox_id: uuid.UUID
    fingerprint: str  # of the credentials: new settings restart the watcher
    task: asyncio.Task[None]
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class IdleSupervisor:
    """`run()` until cancelled; `refresh()` once reconciles watchers with the database."""

    def __init__(self, runtime: Runtime, refresh_seconds: float = 30.0) -> None:
        self.runtime = runtime
        self.refresh_seconds = refresh_seconds
        self.watchers: dict[uuid.UUID, Watcher] = {}
        self.connections = 0  # reconnections included, for tests and the benchmark

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.refresh()
                except Exception:
                    log.exception("IMAP IDLE: could not read the mailboxes to watch")
                await asyncio.sleep(self.refresh_seconds)
        finally:
            await self.stop()

    async def stop(self) -> None:
        watchers = list(self.watchers.values())
        self.watchers.clear()
        for watcher in watchers:
            watcher.task.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher.task

    async def refresh(self) -> None:
        settings = self.runtime.settings
        async with self.runtime.db.sessionmaker() as session:
            rows = list(
                await session.scalars(
                    select(Mailbox).where(
                        Mailbox.provider == Provider.IMAP,
                        Mailbox.status.in_(SYNCABLE),  # type: ignore[attr-defined]
                    )
                )
            )
        wanted: dict[uuid.UUID, tuple[str, ImapConfig]] = {}
        for row in rows:
            try:
                config = ImapConfig.from_credentials(
                    row.email_address, read_credentials(settings.secret, row)
                )
            except (ProviderError, ValueError):
                continue
            fingerprint = hashlib.sha256((row.credentials_encrypted or "").encode()).hexdigest()
            wanted[row.id] = (fingerprint, config)
        for mailbox_id, watcher in list(self.watchers.items()):
            if mailbox_id not in wanted or wanted[mailbox_id][0] != watcher.fingerprint:
                del self.watchers[mailbox_id]
                watcher.task.cancel()
        for mailbox_id, (fingerprint, config) in wanted.items():
            if mailbox_id not in self.watchers:
                connected = asyncio.Event()
                task = asyncio.create_task(
                    self._watch(mailbox_id, config, connected), name=f"idle:{mailbox_id}"
                )
                self.watchers[mailbox_id] = Watcher(mailbox_id, fingerprint, task, connected)

    async def _enqueue(self, mailbox_id: uuid.UUID) -> None:
        await self.runtime.jobs.enqueue_sync(str(mailbox_id))

    async def _watch(
        self, mailbox_id: uuid.UUID, config: ImapConfig, connected: asyncio.Event
    ) -> None:
        settings = self.runtime.settings
        backoff = 1.0
        while True:
            client: aioimaplib.IMAP4 | None = None
            try:
                client = await open_imap(config, settings.imap_ca_file)
                protocol = client.protocol
                # aioimaplib does not end a pending wait for pushes when the connection
                # drops: the callback does, with a marker.
                protocol.conn_lost_cb = lambda _exc, q=protocol.idle_queue: q.put_nowait(LOST)
                response = await client.select("INBOX")
                if response.result != "OK":
                    raise ProviderError(f"SELECT INBOX: {response.result}")
                self.connections += 1
                connected.set()
                backoff = 1.0
                await self._enqueue(mailbox_id)
                if client.has_capability("IDLE"):
                    await self._idle(mailbox_id, client)
                else:
                    await self._poll(mailbox_id, client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                connected.clear()
                delay = backoff * (1 + random.random() / 2)
                log.info(
                    "IMAP IDLE for mailbox %s: %s; reconnecting in %.0f s",
                    mailbox_id,
                    getattr(exc, "detail", None) or repr(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                if client is not None:
                    await close_imap(client)

    async def _idle(self, mailbox_id: uuid.UUID, client: aioimaplib.IMAP4) -> None:
        renew = float(self.runtime.settings.imap_idle_seconds)
        while True:
            idle = await client.idle_start(timeout=renew)
            news = False
            while client.has_pending_idle():
                lines = await client.wait_server_push(timeout=renew + 60)
                if lines == LOST:
                    raise ConnectionError("the server closed the connection")
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                if any(b"EXISTS" in bytes(line) for line in lines):
                    news = True
                    break
            client.idle_done()
            await asyncio.wait_for(idle, client.timeout)
            if news:
                await self._enqueue(mailbox_id)

    async def _poll(self, mailbox_id: uuid.UUID, client: aioimaplib.IMAP4) -> None:
        """Servers without IDLE: NOOP brings EXISTS announcements of new mail."""
        while True:
            await asyncio.sleep(self.runtime.settings.imap_poll_seconds)
            response = await client.noop()
            if response.result != "OK":
                raise ProviderError(f"NOOP: {response.result}")
            if any(b"EXISTS" in bytes(line) for line in response.lines):
                await self._enqueue(mailbox_id)
