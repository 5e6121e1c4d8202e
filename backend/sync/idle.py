"""Push for IMAP mailboxes (R14): one IDLE connection per syncable IMAP mailbox, held on
asyncio by the worker process, enqueueing a pass when the server announces new mail.

Each watcher selects INBOX and IDLEs; IDLE is re-issued every `IMAP_IDLE_SECONDS` (RFC 2177:
servers may end an IDLE after 30 minutes), a lost connection is re-opened with exponential
backoff, and a server without IDLE is checked every `IMAP_POLL_SECONDS` instead. A pass is
enqueued after every (re)connection too, since mail may have arrived while it was down.
The Sent folder is not watched (one IDLE watches one folder): its mail comes with the next
pass, at the latest the periodic one.

Servers cap the connections of one user (Dovecot 10, Gmail 15), so of all the worker
processes only one holds the IDLE connections: the holder of a Redis lease, a key with a
TTL it renews; the others stand by and take over once it lapses. A mailbox whose password
the server refused is not watched again until its credentials change: repeated failed
logins can lock the account.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
LEASE_KEY = "mailsync:imap-idle:leader"

# Renew or release the lease only if this process still holds it (its token is the value).
RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass
class Watcher:
    mailbox_id: uuid.UUID
    fingerprint: str  # of the credentials: new settings restart the watcher
    task: asyncio.Task[None]
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class IdleSupervisor:
    """`run()` until cancelled; `refresh()` once reconciles watchers with the database."""

    def __init__(
        self, runtime: Runtime, refresh_seconds: float = 30.0, lease_key: str = LEASE_KEY
    ) -> None:
        self.runtime = runtime
        self.refresh_seconds = refresh_seconds
        self.lease_key = lease_key
        self.lease_seconds = float(runtime.settings.imap_idle_lease_seconds)
        self.token = uuid.uuid4().hex
        self.leading = False
        self.rounds = 0  # completed run() iterations, for tests
        self.watchers: dict[uuid.UUID, Watcher] = {}
        # Mailboxes whose login was refused, with the fingerprint of the refused credentials.
        self.refused: dict[uuid.UUID, str] = {}
        self.connections = 0  # reconnections included, for tests and the benchmark
        self.login_refusals = 0
        self._held_until = 0.0

    async def run(self) -> None:
        # Renewed well within the TTL, so one slow round does not let the lease lapse.
        interval = min(self.refresh_seconds, self.lease_seconds / 3)
        try:
            while True:
                if await self._lead():
                    try:
                        await self.refresh()
                    except Exception:
                        log.exception("IMAP IDLE: could not read the mailboxes to watch")
                elif self.watchers:
                    log.info("IMAP IDLE: another worker holds the connections now")
                    await self.stop()
                self.rounds += 1
                await asyncio.sleep(interval)
        finally:
            await self.stop()
            await self._release()

    async def _lead(self) -> bool:
        """Take or renew the lease; whether this process may hold the connections now."""
        loop = asyncio.get_running_loop()
        ttl_ms = int(self.lease_seconds * 1000)
        try:
            if self.leading:
                held = bool(await self._script(RENEW, self.token, str(ttl_ms)))
            else:
                held = bool(
                    await self.runtime.redis.set(self.lease_key, self.token, px=ttl_ms, nx=True)
                )
        except Exception as exc:
            # Unreachable Redis: keep what the last renewal granted, no longer (another
            # worker may take the lease once it lapses).
            log.warning("IMAP IDLE: could not renew the lease: %r", exc)
            self.leading = self.leading and loop.time() < self._held_until
            return self.leading
        if held:
            self._held_until = loop.time() + self.lease_seconds
        self.leading = held
        return held

    async def _script(self, script: str, *args: str) -> Any:
        result = self.runtime.redis.eval(script, 1, self.lease_key, *args)
        return await result if inspect.isawaitable(result) else result

    async def _release(self) -> None:
        if not self.leading:
            return
        self.leading = False
        # The next worker need not wait for the TTL.
        with contextlib.suppress(Exception):
            await self._script(RELEASE, self.token)

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
            if self.refused.get(row.id) == fingerprint:
                continue
            self.refused.pop(row.id, None)
            wanted[row.id] = (fingerprint, config)
        for mailbox_id, watcher in list(self.watchers.items()):
            if mailbox_id not in wanted or wanted[mailbox_id][0] != watcher.fingerprint:
                del self.watchers[mailbox_id]
                watcher.task.cancel()
        for mailbox_id, (fingerprint, config) in wanted.items():
            if mailbox_id not in self.watchers:
                connected = asyncio.Event()
                task = asyncio.create_task(
                    self._watch(mailbox_id, fingerprint, config, connected),
                    name=f"idle:{mailbox_id}",
                )
                self.watchers[mailbox_id] = Watcher(mailbox_id, fingerprint, task, connected)

    async def _enqueue(self, mailbox_id: uuid.UUID) -> None:
        await self.runtime.jobs.enqueue_sync(str(mailbox_id))

    async def _watch(
        self,
        mailbox_id: uuid.UUID,
        fingerprint: str,
        config: ImapConfig,
        connected: asyncio.Event,
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
                if getattr(exc, "connect_code", None) == "AUTH_FAILED":
                    # Retrying a refused password risks locking the account: wait for new
                    # credentials (refresh() compares the fingerprint).
                    self.refused[mailbox_id] = fingerprint
                    self.login_refusals += 1
                    log.warning(
                        "IMAP IDLE for mailbox %s: the server refused the login; not watched "
                        "until its credentials change",
                        mailbox_id,
                    )
                    return
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
