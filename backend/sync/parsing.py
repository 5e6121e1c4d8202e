"""RFC 5322 bytes to the fields the product keeps (R10), tolerant of real-world breakage."""

from __future__ import annotations

import asyncio
import html
import multiprocessing
import pickle
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import Header, decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

import nh3

from backend.kit.addresses import normalize_address
from backend.kit.html import sanitize_html

SNIPPET_LENGTH = 200
MAX_NAME = 320  # the participants.name column
MAX_MESSAGE_ID = 998  # RFC 5322's line limit, and the emails.message_id column
KEPT_HEADERS = (
    "message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "auto-submitted",
    "precedence",
    "x-mailer",
)
_MSGID = re.compile(r"<[^<>\s]+>")
_SPACE = re.compile(r"\s+")
_NO_REPLY = re.compile(
    r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer-daemon|postmaster|bounces?)([+-].*)?$"
)


class UnparseableMessage(ValueError):
    """The bytes are not a message we can file (empty, binary, no headers)."""


@dataclass
class ParsedAddress:
    address: str
    name: str | None


@dataclass
class ParsedMessage:
    message_id: str | None
    subject: str | None
    sender: ParsedAddress | None
    to: list[ParsedAddress]
    cc: list[ParsedAddress]
    bcc: list[ParsedAddress]
    date: datetime | None
    in_reply_to: str | None
    references: list[str]
    body_text: str | None
    body_html: str | None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def snippet(self) -> str | None:
        if not self.body_text:
            return None
        # Whitespace collapses, so a prefix a few times the snippet's length is enough.
        head = self.body_text[: SNIPPET_LENGTH * 8]
        return _SPACE.sub(" ", head).strip()[:SNIPPET_LENGTH] or None

    @property
    def is_bulk(self) -> bool:
        """Mailing lists and robots: never a reason to create a contact (R5)."""
        h = self.headers
        if "list-unsubscribe" in h or "list-id" in h:
            return True
        if h.get("precedence", "").strip().lower() in {"bulk", "list", "junk"}:
            return True
        auto = h.get("auto-submitted", "").strip().lower()
        return bool(auto) and auto != "no"


def is_no_reply(address: str) -> bool:
    return bool(_NO_REPLY.match(address.partition("@")[0]))


# Parsing uses compat32 and decodes only the fields the product keeps: policy.default parses
# every header it touches through the header registry, several times slower overall.
_PARSER = BytesParser(policy=compat32)


def _to_text(value: object) -> str:
    """A header value as text: encoded words decoded, raw 8-bit bytes read as UTF-8."""
    try:
        parts = decode_header(value if isinstance(value, Header) else str(value))
    except (HeaderParseError, ValueError, LookupError):
        parts = [(str(value), None)]
    decoded: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            decoded.append(_undo_surrogates(chunk))
        else:
            decoded.append(_bytes_to_text(chunk, charset))
    return "".join(decoded)


def _bytes_to_text(data: bytes, charset: str | None) -> str:
    if charset and charset not in {"unknown-8bit", "us-ascii"}:
        try:
            return data.decode(charset, errors="replace")
        except LookupError:
            pass
    # Undeclared 8-bit text: UTF-8 when it is valid UTF-8, else the usual Windows suspect.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _undo_surrogates(text: str) -> str:
    """compat32 keeps undecodable header bytes as surrogates; decode those bytes properly."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return _bytes_to_text(text.encode("ascii", "surrogateescape"), None)


def _header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    text = _to_text(value).replace("\x00", "")
    return _SPACE.sub(" ", text).strip() or None


def _raw_header(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    return None if value is None else _undo_surrogates(str(value))


def _addresses(msg: Message, name: str) -> list[ParsedAddress]:
    values = [_undo_surrogates(str(v)) for v in msg.get_all(name, failobj=[])]
    found: list[ParsedAddress] = []
    seen: set[str] = set()
    for display, addr in getaddresses(values):
        if "=?" in addr:  # an encoded word inside an address: invalid, but generated in the wild
            addr = "".join(_to_text(addr).split())
        address = normalize_address(addr)
        if "@" not in address or address in seen or len(address) > 320:
            continue
        seen.add(address)
        name_text = _SPACE.sub(" ", _to_text(display)).strip()[:MAX_NAME] if display else ""
        found.append(ParsedAddress(address=address, name=name_text or None))
    return found


def _message_ids(value: str | None) -> list[str]:
    return [m for m in _MSGID.findall(value or "") if len(m) <= MAX_MESSAGE_ID]


def _message_id(value: str | None) -> str | None:
    """The Message-ID, also when a sender forgot the angle brackets (R7 needs it)."""
    found = _message_ids(value)
    if found:
        return found[0]
    bare = (value or "").strip()
    if (
        bare
        and "@" in bare
        and not any(c.isspace() for c in bare)
        and len(bare) < MAX_MESSAGE_ID - 2
    ):
        return f"<{bare.strip('<>')}>"
    return None


def _date(msg: Message) -> datetime | None:
    raw = _raw_header(msg, "date")
    if not raw:
        return None
    try:
        value = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _decode(part: Message) -> str | None:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def _size(part: Message) -> int:
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except (LookupError, ValueError, UnicodeError):
        return "attachment"
    return _to_text(name) if name else None


_CID_REF = re.compile(r"""cid:([^"'\s)>]+)""", re.IGNORECASE)


def _content_id(part: Message) -> str | None:
    value = part.get("content-id")
    if value is None:
        return None
    bare = _undo_surrogates(str(value)).strip().strip("<>").strip()
    return bare.lower() or None


def _cid_refs(html_body: str | None) -> set[str]:
    """The Content-IDs the HTML shows (RFC 2392 `cid:` URLs are URL-encoded)."""
    if not html_body or "cid:" not in html_body.lower():
        return set()
    return {unquote(html.unescape(m)).strip("<>").lower() for m in _CID_REF.findall(html_body)}


def _walk(msg: Message) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    leaves = [part for part in msg.walk() if not part.is_multipart()]
    text: str | None = None
    html_body: str | None = None
    for part in leaves:
        disposition = (part.get_content_disposition() or "").lower()
        if disposition == "attachment" or (_filename(part) and disposition != "inline"):
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain" and text is None:
            text = _decode(part)
        elif ctype == "text/html" and html_body is None:
            html_body = _decode(part)
    shown = _cid_refs(html_body)
    attachments: list[dict[str, Any]] = []
    for part in leaves:
        ctype = part.get_content_type()
        cid = _content_id(part)
        # R10: a part the HTML shows through `cid:` is inline whatever its disposition says
        # (Outlook marks such images `attachment`, others give them a filename only).
        if cid is not None and cid in shown:
            continue
        disposition = (part.get_content_disposition() or "").lower()
        filename = _filename(part)
        if disposition == "attachment" or (filename and disposition != "inline"):
            attachments.append(
                {"filename": filename or "attachment", "content_type": ctype, "size": _size(part)}
            )
            continue
        if cid is not None and ctype.startswith("image/"):
            continue  # an inline image with a Content-ID is part of the body.
        if ctype in ("text/plain", "text/html"):
            continue  # the bodies (only the first of each kind is kept)
        if filename:
            attachments.append({"filename": filename, "content_type": ctype, "size": _size(part)})
    return text, html_body, attachments


def html_to_text(value: str) -> str:
    stripped = nh3.clean(value, tags=set(), clean_content_tags={"script", "style", "head", "title"})
    return _SPACE.sub(" ", html.unescape(stripped)).strip()


def parse_message(raw: bytes) -> ParsedMessage:
    if not raw or not raw.strip():
        raise UnparseableMessage("empty message")
    msg = _PARSER.parsebytes(raw)
    if not msg.keys():
        raise UnparseableMessage("no headers")
    text, html_body, attachments = _walk(msg)
    if html_body is not None:
        html_body = sanitize_html(html_body)
        if text is None:
            text = html_to_text(html_body)
    senders = _addresses(msg, "from") or _addresses(msg, "sender")
    headers = {name: value for name in KEPT_HEADERS if (value := _header(msg, name)) is not None}
    in_reply_to = _message_ids(_raw_header(msg, "in-reply-to"))
    return ParsedMessage(
        message_id=_message_id(_raw_header(msg, "message-id")),
        subject=_header(msg, "subject"),
        sender=senders[0] if senders else None,
        to=_addresses(msg, "to"),
        cc=_addresses(msg, "cc"),
        bcc=_addresses(msg, "bcc"),
        date=_date(msg),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_message_ids(_raw_header(msg, "references"))[-50:],
        body_text=text.replace("\x00", "") if text else None,
        body_html=html_body.replace("\x00", "") if html_body else None,
        attachments=attachments,
        headers=headers,
    )


def parse_each(raws: Sequence[bytes]) -> list[ParsedMessage | Exception]:
    """Each message parsed, or the exception its parse raised (made picklable, as this runs in
    the parse processes)."""
    out: list[ParsedMessage | Exception] = []
    for raw in raws:
        try:
            out.append(parse_message(raw))
        except Exception as exc:
            try:
                pickle.dumps(exc)
                out.append(exc)
            except Exception:
                out.append(UnparseableMessage(repr(exc)))
    return out


# Parsing is the CPU cost of a pass; in a thread it shares the event loop's GIL with storing,
# so the two barely overlap. Processes parse while this one stores (docs/performance.md).
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _parse_pool(processes: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != processes:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            # spawn, not fork: the worker holds threads (database driver) and an event loop.
            _pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
            _pool_size = processes
        return _pool


def _drop_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def shutdown_pool() -> None:
    """Stop the parse processes (a worker's shutdown): they would outlive an embedding
    event loop, and a stopped worker should leave no children behind."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


Parse = Callable[[Sequence[bytes]], list[ParsedMessage | Exception]]


def _spawn_one() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


async def _parse_one_by_one(batch: list[bytes], parse: Parse) -> list[ParsedMessage | Exception]:
    """After a parse process died: each message alone in a separate process, so that the
    message that kills a process is found and fails by itself (IMPORT_FAILED), and no
    message is ever parsed inside the worker, which it could take down with it."""
    loop = asyncio.get_running_loop()
    out: list[ParsedMessage | Exception] = []
    pool = _spawn_one()
    try:
        for raw in batch:
            try:
                (parsed,) = await loop.run_in_executor(pool, parse, [raw])
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _spawn_one()
                parsed = UnparseableMessage("the parse process died on this message")
            out.append(parsed)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


async def parse_many(
    raws: Sequence[bytes], processes: int, *, parse: Parse = parse_each
) -> list[ParsedMessage | Exception]:
    """Parse a batch off the event loop: split between `processes` parse processes, or in a
    thread when that is 0; results in the batch's order. When a process dies, its pool is
    replaced on the next batch and this batch is parsed again one message per process
    (`parse` is what each process runs: `parse_each`, or a stand-in in tests)."""
    batch = list(raws)
    if processes <= 0 or not batch:
        return await asyncio.to_thread(parse, batch)
    pool = _parse_pool(processes)
    loop = asyncio.get_running_loop()
    # One slice per process, so that every process parses a share of the batch.
    size = -(-len(batch) // processes)
    slices = [batch[i : i + size] for i in range(0, len(batch), size)]
    try:
        # Every slice's answer is awaited, so none is left to fail unobserved after a crash.
        answers = await asyncio.gather(
            *(loop.run_in_executor(pool, parse, piece) for piece in slices),
            return_exceptions=True,
        )
    except BrokenProcessPool:  # broken before this batch: submitting raises at once
        answers = [BrokenProcessPool()]
    if any(isinstance(answer, BrokenProcessPool) for answer in answers):
        _drop_pool(pool)
        return await _parse_one_by_one(batch, parse)
    out: list[ParsedMessage | Exception] = []
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
        out.extend(answer)
    return out
