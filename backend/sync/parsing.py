"""RFC 5322 bytes to the fields the product keeps (R10), tolerant of real-world breakage."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

import nh3

from backend.kit.addresses import normalize_address

SNIPPET_LENGTH = 200
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
_PARSER = BytesParser(policy=policy.default)


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
        return _SPACE.sub(" ", self.body_text).strip()[:SNIPPET_LENGTH] or None

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


def _header(msg: Message, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:  # a header the policy cannot even fold
        raw = msg.get_all(name, failobj=[])
        value = raw[0] if raw else None
    if value is None:
        return None
    text = str(value).replace("\x00", "")
    return _SPACE.sub(" ", text).strip() or None


def _addresses(msg: Message, name: str) -> list[ParsedAddress]:
    values: list[str] = []
    try:
        for header in msg.get_all(name, failobj=[]):
            addresses = getattr(header, "addresses", None)
            if addresses is not None:
                values.extend(_format(a) for a in addresses)
            else:
                values.append(str(header))
    except Exception:
        values = [str(v) for v in msg.get_all(name, failobj=[]) if v is not None]
    found: list[ParsedAddress] = []
    seen: set[str] = set()
    for display, addr in getaddresses(values):
        address = normalize_address(addr)
        if "@" not in address or address in seen or len(address) > 320:
            continue
        seen.add(address)
        found.append(ParsedAddress(address=address, name=display.strip() or None))
    return found


def _format(address: Address) -> str:
    if address.display_name:
        quoted = address.display_name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address.addr_spec}>'
    return address.addr_spec


def _message_ids(value: str | None) -> list[str]:
    return _MSGID.findall(value or "")


def _message_id(value: str | None) -> str | None:
    """The Message-ID, also when a sender forgot the angle brackets (R7 needs it)."""
    found = _message_ids(value)
    if found:
        return found[0]
    bare = (value or "").strip()
    if bare and "@" in bare and not any(c.isspace() for c in bare) and len(bare) < 990:
        return f"<{bare.strip('<>')}>"
    return None


def _date(msg: Message) -> datetime | None:
    raw = _header(msg, "date")
    if not raw:
        return None
    try:
        value = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _decode(part: Message) -> str | None:
    try:
        content = part.get_content() if isinstance(part, EmailMessage) else None
    except (LookupError, UnicodeError, ValueError, AssertionError, KeyError):
        content = None
    if isinstance(content, str):
        return content
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


def _walk(msg: Message) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    text: str | None = None
    html_body: str | None = None
    attachments: list[dict[str, Any]] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        disposition = (part.get_content_disposition() or "").lower()
        filename = part.get_filename()
        if disposition == "attachment" or (filename and disposition != "inline"):
            attachments.append(
                {"filename": filename or "attachment", "content_type": ctype, "size": _size(part)}
            )
            continue
        if part.get("content-id") and ctype.startswith("image/"):
            continue  # R10: inline (cid) images are part of the body, not attachments.
        if ctype == "text/plain" and text is None:
            text = _decode(part)
        elif ctype == "text/html" and html_body is None:
            html_body = _decode(part)
        elif filename:
            attachments.append({"filename": filename, "content_type": ctype, "size": _size(part)})
    return text, html_body, attachments


def sanitize_html(value: str) -> str:
    """Safe to render as-is in a browser: no scripts, handlers, or remote-loading tricks."""
    return nh3.clean(value, link_rel="noopener noreferrer nofollow")


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
    in_reply_to = _message_ids(_header(msg, "in-reply-to"))
    return ParsedMessage(
        message_id=_message_id(_header(msg, "message-id")),
        subject=_header(msg, "subject"),
        sender=senders[0] if senders else None,
        to=_addresses(msg, "to"),
        cc=_addresses(msg, "cc"),
        bcc=_addresses(msg, "bcc"),
        date=_date(msg),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_message_ids(_header(msg, "references"))[-50:],
        body_text=text.replace("\x00", "") if text else None,
        body_html=html_body.replace("\x00", "") if html_body else None,
        attachments=attachments,
        headers=headers,
    )
