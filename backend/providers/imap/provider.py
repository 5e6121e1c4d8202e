"""Any mailbox reachable by IMAP and SMTP submission, behind `MailProvider`.

Cursor: `{"folders": {"INBOX": {"uidvalidity", "uid", "modseq"}, "SENT": {...}}}`, the last
UID listed in each folder under its UIDVALIDITY. A changed UIDVALIDITY (the server renumbered
the folder) re-lists the folder since the connection; R7 files nothing twice. With CONDSTORE
an unchanged HIGHESTMODSEQ skips the folder's search. Message refs are
`<folder key>:<UIDVALIDITY>:<UID>`, folder keys `INBOX` and `SENT`.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, ClassVar

import aioimaplib
import aiosmtplib

from backend.providers.base import (
    ChangeSet,
    FetchedMessage,
    MailboxAccount,
    MailProvider,
    MessageRef,
    PermanentProviderError,
    Provider,
    ProviderError,
    SendLimits,
    SendRejected,
    SendRejection,
    SentMessage,
    SyncErrorCode,
    TransientProviderError,
    bare_message_id,
)
from backend.providers.imap.client import (
    ImapConfig,
    close_imap,
    close_smtp,
    open_imap,
    open_smtp,
    server_error,
)
from backend.providers.registry import register
from backend.settings import Settings

INBOX = "INBOX"
SENT = "SENT"
# Names servers give their Sent folder when they do not mark it with SPECIAL-USE.
SENT_NAMES = ("Sent", "Sent Items", "Sent Messages", "Sent Mail", "INBOX.Sent", "INBOX/Sent")
# Servers that file what their SMTP submission sends in the Sent folder by themselves; the
# rest get the copy through APPEND.
KEEPS_SENT_COPY = ("gmail.com", "googlemail.com", "office365.com", "outlook.com")
FETCH_CHUNK = 50

_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?P<delim>"[^"]*"|NIL) (?P<name>.+)$')
_CODE_VALUE = re.compile(rb"\[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]")
_FETCH_HEAD = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"UID (\d+)")
_INTERNALDATE = re.compile(rb'INTERNALDATE "([^"]+)"')
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


def _unquote(name: bytes) -> str:
    text = name.decode("utf-8", errors="replace").strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return text


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_ref(folder: str, uidvalidity: int, uid: int) -> str:
    return f"{folder}:{uidvalidity}:{uid}"


def parse_ref(provider_id: str) -> tuple[str, int, int]:
    folder, validity, uid = provider_id.rsplit(":", 2)
    return folder, int(validity), int(uid)


class ImapProvider(MailProvider):
    send_limits: ClassVar[SendLimits] = SendLimits(max_recipients=100, max_bytes=25 * 1024 * 1024)

    def __init__(self, account: MailboxAccount, config: ImapConfig, settings: Settings) -> None:
        self.account = account
        self.config = config
        self.ca_file = settings.imap_ca_file
        self.aliases: list[str] = []
        # Awaited once SMTP accepted a message, before its APPEND to Sent: the send job
        # records the acceptance there, so a retry after a crash between the two only files
        # the copy instead of sending again (R15).
        self.on_accepted: Callable[[], Awaitable[None]] | None = None
        self._imap: aioimaplib.IMAP4 | None = None
        self._folders: dict[str, str] | None = None
        self._selected: str | None = None
        self._select_info: dict[str, int] = {}
        self._lock = asyncio.Lock()

    # --- connection ----------------------------------------------------------------------

    async def _client(self) -> aioimaplib.IMAP4:
        if (
            self._imap is None
            or self._imap.protocol.transport is None
            or (self._imap.protocol.transport.is_closing())
        ):
            self._imap = await open_imap(self.config, self.ca_file)
            self._selected = None
        return self._imap

    async def close(self) -> None:
        if self._imap is not None:
            await close_imap(self._imap)
            self._imap = None

    async def _run(self, what: str, call: Any) -> Any:
        """One IMAP command; a lost connection is a transient failure (R13)."""
        try:
            response = await call
        except (TimeoutError, OSError, aioimaplib.AioImapException) as exc:
            await self.close()
            raise TransientProviderError(f"{what}: connection lost ({exc!r})") from exc
        if response.result != "OK":
            raise server_error(what, response.result, response.lines)
        return response

    async def folders(self) -> dict[str, str]:
        """{"INBOX": name, "SENT": name}: Sent found by SPECIAL-USE, else by its usual names."""
        if self._folders is not None:
            return self._folders
        client = await self._client()
        response = await self._run("LIST", client.list('""', '"*"'))
        names: dict[str, set[str]] = {}
        for line in response.lines:
            match = _LIST.match(bytes(line))
            if match:
                flags = {f.lower() for f in match["flags"].decode(errors="replace").split()}
                names[_unquote(match["name"])] = flags
        found = {INBOX: INBOX}
        sent = next((n for n, f in names.items() if "\\sent" in f), None)
        if sent is None:
            lowered = {n.lower(): n for n in names}
            sent = next((lowered[c.lower()] for c in SENT_NAMES if c.lower() in lowered), None)
        if sent is not None:
            found[SENT] = sent
        self._folders = found
        return found

    async def _select(self, key: str, *, readonly: bool = False) -> dict[str, int]:
        folders = await self.folders()
        name = folders.get(key)
        if name is None:
            raise PermanentProviderError(f"no {key} folder", SyncErrorCode.MAILBOX_NOT_FOUND)
        client = await self._client()
        if self._selected == name:
            return self._select_info
        self._selected = None
        args = [_quote(name)]
        if "CONDSTORE" in client.protocol.capabilities:
            args.append("(CONDSTORE)")
        command = "EXAMINE" if readonly else "SELECT"
        response = await self._run(
            f"{command} {name}",
            asyncio.wait_for(
                client.protocol.execute(
                    aioimaplib.Command(
                        command, client.protocol.new_tag(), *args, loop=client.protocol.loop
                    )
                ),
                client.timeout,
            ),
        )
        if not readonly:
            client.protocol.state = aioimaplib.SELECTED
        info: dict[str, int] = {}
        for line in response.lines:
            text = bytes(line)
            for code, value in _CODE_VALUE.findall(text):
                info[code.decode()] = int(value)
            # `\*` among the permanent flags: clients may create keywords (RFC 3501 7.1).
            if b"PERMANENTFLAGS" in text and b"\\*" in text:
                info["KEYWORDS"] = 1
        self._selected = name if not readonly else None
        self._select_info = info
        return info

    async def _uid(self, what: str, *args: str) -> Any:
        client = await self._client()
        return await self._run(what, client.uid(*args))

    # --- MailProvider --------------------------------------------------------------------

    async def own_addresses(self) -> list[str]:
        return [self.account.email_address, *self.aliases]

    async def list_changes(self, cursor: dict[str, Any] | None, since: datetime) -> ChangeSet:
        async with self._lock:
            old = dict((cursor or {}).get("folders") or {})
            new: dict[str, Any] = {}
            refs: list[MessageRef] = []
            full = False
            for key in (INBOX, SENT):
                if key not in await self.folders():
                    continue
                info = await self._select(key)
                validity = info.get("UIDVALIDITY", 0)
                uidnext = info.get("UIDNEXT")
                modseq = info.get("HIGHESTMODSEQ")
                prior = old.get(key)
                if prior is not None and int(prior.get("uidvalidity", -1)) != validity:
                    full = True  # the server renumbered this folder
                    prior = None
                if prior is None:
                    uids = await self._search("SINCE", since.strftime("%d-%b-%Y"))
                    last = max(uids, default=(uidnext - 1 if uidnext else 0))
                else:
                    last = int(prior.get("uid", 0))
                    unchanged = modseq is not None and prior.get("modseq") == modseq
                    if unchanged or (uidnext is not None and uidnext <= last + 1):
                        uids = []
                    else:
                        uids = [u for u in await self._search("UID", f"{last + 1}:*") if u > last]
                    last = max([last, *uids])
                refs.extend(MessageRef(make_ref(key, validity, uid)) for uid in sorted(uids))
                new[key] = {"uidvalidity": validity, "uid": last, "modseq": modseq}
            return ChangeSet(refs=refs, cursor={"folders": new}, full_resync=full)

    async def _search(self, *criteria: str) -> list[int]:
        client = await self._client()
        response = await self._run(
            "UID SEARCH",
            asyncio.wait_for(
                client.protocol.search(*criteria, charset=None, by_uid=True), client.timeout
            ),
        )
        uids: list[int] = []
        # aioimaplib strips the untagged `SEARCH`; the last line is the tagged completion.
        for line in response.lines[:-1]:
            uids.extend(int(u) for u in bytes(line).split() if u.isdigit())
        return uids

    async def fetch(self, refs: Sequence[MessageRef]) -> list[FetchedMessage | ProviderError]:
        async with self._lock:
            found: dict[str, FetchedMessage] = {}
            by_folder: dict[str, list[tuple[int, int]]] = {}
            for ref in refs:
                key, validity, uid = parse_ref(ref.provider_id)
                by_folder.setdefault(key, []).append((validity, uid))
            for key, items in by_folder.items():
                info = await self._select(key)
                validity = info.get("UIDVALIDITY", 0)
                uids = [uid for v, uid in items if v == validity]
                for start in range(0, len(uids), FETCH_CHUNK):
                    chunk = uids[start : start + FETCH_CHUNK]
                    response = await self._uid(
                        "UID FETCH",
                        "fetch",
                        ",".join(str(u) for u in chunk),
                        "(UID INTERNALDATE BODY.PEEK[])",
                    )
                    for uid, raw, internal in _fetched(response.lines):
                        provider_id = make_ref(key, validity, uid)
                        found[provider_id] = FetchedMessage(
                            ref=MessageRef(provider_id),
                            raw=raw,
                            labels=[key],
                            internal_date=internal,
                        )
            return [
                found.get(ref.provider_id)
                or PermanentProviderError(
                    f"{ref.provider_id} is no longer in the mailbox", SyncErrorCode.READ_FAILED
                )
                for ref in refs
            ]

    async def mark(self, provider_ids: Sequence[str], label: str) -> None:
        """The label as an IMAP keyword, where the folder lets clients make keywords."""
        async with self._lock:
            by_folder: dict[str, list[int]] = {}
            for provider_id in provider_ids:
                key, _, uid = parse_ref(provider_id)
                by_folder.setdefault(key, []).append(uid)
            for key, uids in by_folder.items():
                if not (await self._select(key)).get("KEYWORDS"):
                    continue
                await self._uid(
                    "UID STORE",
                    "store",
                    ",".join(str(u) for u in uids),
                    "+FLAGS.SILENT",
                    f"({label})",
                )

    async def find_sent(self, message_id: str) -> SentMessage | None:
        async with self._lock:
            if SENT not in await self.folders():
                return None
            info = await self._select(SENT)
            uids = await self._search("HEADER", "Message-ID", _quote(bare_message_id(message_id)))
            if not uids:
                return None
            return SentMessage(make_ref(SENT, info.get("UIDVALIDITY", 0), max(uids)))

    async def send(self, raw: bytes, thread_id: str | None = None) -> SentMessage:
        message = message_from_bytes(raw, policy=policy.SMTP)
        assert isinstance(message, EmailMessage)
        sender = _addresses(message, "From")
        recipients = _addresses(message, "To", "Cc", "Bcc")
        if not recipients:
            raise SendRejected("no recipients", SendRejection.RECIPIENT_REJECTED)
        # Bcc recipients get the message, never the header (RFC 5322 3.6.3); the Sent copy
        # keeps it, as mail clients do.
        wire = message_from_bytes(raw, policy=policy.SMTP)
        del wire["Bcc"]
        smtp = await self._smtp()
        try:
            await smtp.send_message(
                wire,
                sender=sender[0] if sender else self.account.email_address,
                recipients=recipients,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise SendRejected(
                f"recipients refused: {[r.recipient for r in exc.recipients]}",
                SendRejection.RECIPIENT_REJECTED,
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _smtp_failure(exc) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientProviderError(f"SMTP: {exc!r}", SyncErrorCode.SEND_FAILED) from exc
        finally:
            await close_smtp(smtp)
        if self.on_accepted is not None:
            await self.on_accepted()
        return await self._file_sent(raw)

    async def file_accepted(self, raw: bytes, message_id: str) -> SentMessage:
        """The Sent copy of a message SMTP accepted on an earlier attempt: the one there if
        that attempt's APPEND happened, else APPENDed now. Never sends."""
        return await self.find_sent(message_id) or await self._file_sent(raw)

    async def _smtp(self) -> aiosmtplib.SMTP:
        try:
            return await open_smtp(self.config, self.ca_file)
        except ProviderError as exc:
            if exc.code == SyncErrorCode.ACCESS_DENIED:
                raise
            raise TransientProviderError(exc.detail, SyncErrorCode.SEND_FAILED) from exc

    async def _file_sent(self, raw: bytes) -> SentMessage:
        """APPEND the sent message to Sent, unless the server files it by itself; the answer
        names the copy (UIDPLUS) so that sync finds the same email (R7)."""
        host = self.config.smtp_host.lower()
        if any(host == d or host.endswith("." + d) for d in KEEPS_SENT_COPY):
            return SentMessage("")
        async with self._lock:
            try:
                folders = await self.folders()
                if SENT not in folders:
                    return SentMessage("")
                client = await self._client()
                self._selected = None
                response = await self._run(
                    "APPEND", client.append(raw, mailbox=_quote(folders[SENT]), flags="(\\Seen)")
                )
            except ProviderError:
                # The message is sent; a missing Sent copy must not make it look unsent.
                return SentMessage("")
            for line in response.lines:
                match = _APPENDUID.search(bytes(line))
                if match:
                    return SentMessage(make_ref(SENT, int(match[1]), int(match[2])))
            return SentMessage("")


def _fetched(lines: Sequence[Any]) -> list[tuple[int, bytes, datetime | None]]:
    """(uid, raw, internal date) of each message of a UID FETCH answer."""
    out: list[tuple[int, bytes, datetime | None]] = []
    index = 0
    while index < len(lines):
        head = bytes(lines[index])
        if _FETCH_HEAD.match(head) and head.endswith(b"}") and index + 1 < len(lines):
            raw = bytes(lines[index + 1])
            tail = bytes(lines[index + 2]) if index + 2 < len(lines) else b""
            uid = _UID.search(head) or _UID.search(tail)
            internal = _INTERNALDATE.search(head) or _INTERNALDATE.search(tail)
            date = None
            if internal:
                try:
                    date = datetime.strptime(internal[1].decode(), "%d-%b-%Y %H:%M:%S %z")
                except ValueError:
                    date = None
            if uid:
                out.append((int(uid[1]), raw, date))
            index += 3
        else:
            index += 1
    return out


def _addresses(message: EmailMessage, *headers: str) -> list[str]:
    values = [str(v) for h in headers for v in message.get_all(h, [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def _smtp_failure(exc: aiosmtplib.SMTPResponseException) -> ProviderError:
    detail = f"SMTP {exc.code}: {exc.message}"[:500]
    if exc.code == 552 or exc.code == 523:
        return SendRejected(detail, SendRejection.TOO_LARGE)
    if exc.code in (550, 551, 553):
        return SendRejected(detail, SendRejection.RECIPIENT_REJECTED)
    if exc.code == 535:
        return PermanentProviderError(detail, SyncErrorCode.ACCESS_DENIED)
    if 400 <= exc.code < 500:
        return TransientProviderError(detail, SyncErrorCode.SEND_FAILED)
    return SendRejected(detail)


def create(
    account: MailboxAccount, credentials: dict[str, Any], settings: Settings
) -> MailProvider:
    # The user's other identities are the mailbox's aliases (connectImapMailbox's
    # `identities`), which sync reads from the row; the credentials hold only the login.
    return ImapProvider(
        account, ImapConfig.from_credentials(account.email_address, credentials), settings
    )


register(Provider.IMAP, create)
