"""R16: the original correspondence inside a forwarded message.

Two forms exist in the wild: the original attached whole (a `message/rfc822` part, Gmail's
and Outlook's "forward as attachment"), and the inline forward that mail clients write by
default, a header block quoted above the original body:

    ---------- Forwarded message ---------            (Gmail)
    From: Alice Client <alice@client.test>
    Date: Tue, Dec 1, 2026 at 10:00 AM
    Subject: Quote
    To: Bob <bob@crm.test>

    ________________________________                  (Outlook; or -----Original Message-----)
    From: Alice Client <alice@client.test>
    Sent: Tuesday, December 1, 2026 10:00 AM
    To: Bob <bob@crm.test>
    Subject: Quote

An inline forward carries no Message-ID: the original's is synthesized from its participants,
date and subject, so the same forward captured twice is stored once (R7).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime, parsedate_tz

from backend.kit.addresses import normalize_address
from backend.sync.parsing import ParsedAddress, ParsedMessage, UnparseableMessage, parse_message

_PARSER = BytesParser(policy=compat32)
# Gmail "---------- Forwarded message ---------", Thunderbird "-------- Forwarded Message --------"
_GMAIL_MARK = re.compile(r"^\s*-{4,}\s*Forwarded message\s*-{4,}\s*$", re.IGNORECASE)
_APPLE_MARK = re.compile(r"^\s*Begin forwarded message:\s*$", re.IGNORECASE)
# Outlook: a rule of underscores or "-----Original Message-----" above a From/Sent block.
_OUTLOOK_MARK = re.compile(r"^\s*(_{10,}|-{3,}\s*Original Message\s*-{3,})\s*$", re.IGNORECASE)
_FORWARD_SUBJECT = re.compile(r"^\s*(fwd?|tr|wg|rv|enc)\s*:", re.IGNORECASE)
_FIELD = re.compile(r"^\s*\**(From|Sent|Date|To|Cc|Subject)\**\s*:\s*(.*)$", re.IGNORECASE)
_MAILTO = re.compile(r"\[mailto:([^\]]+)\]", re.IGNORECASE)
_WEEKDAY = re.compile(
    r"^(mon|tue|wed|thu|fri|sat|sun)[a-z]*\.?,?\s+", re.IGNORECASE
)  # "Tue, " / "Tuesday, "
_DATE_FORMATS = (
    "%b %d, %Y %I:%M %p",  # Gmail: Dec 1, 2026 10:00 AM ("at" removed)
    "%B %d, %Y %I:%M %p",  # Outlook: December 1, 2026 10:00 AM
    "%d %B %Y %H:%M",  # Outlook, European locales: 1 December 2026 10:00
    "%d %b %Y %H:%M",
    "%Y-%m-%d %H:%M",
    "%B %d, %Y %I:%M:%S %p",
)
_HEADER_LIMIT = 40  # lines of a header block at most (long To/Cc lists wrap)


def attached_original(raw: bytes) -> bytes | None:
    """The first `message/rfc822` part's bytes, when the message has one."""
    msg = _PARSER.parsebytes(raw)
    for part in msg.walk():
        if part.get_content_type() != "message/rfc822":
            continue
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, Message):
            return inner.as_bytes()
    return None


def original_of(raw: bytes, outer: ParsedMessage) -> ParsedMessage | None:
    """The forwarded original, or None when the message is not a forward."""
    attached = attached_original(raw)
    if attached is not None:
        try:
            return parse_message(attached)
        except UnparseableMessage:
            return None
    return inline_original(outer, _outer_offset(raw))


def _outer_offset(raw: bytes) -> timezone | None:
    """The forwarder's time zone, from the outer Date: inline dates name none."""
    value = _PARSER.parsebytes(raw, headersonly=True).get("date")
    parsed = parsedate_tz(str(value)) if value else None
    if parsed is None or parsed[9] is None:
        return None
    return timezone(timedelta(seconds=parsed[9]))


def _block_start(lines: list[str], forward_subject: bool) -> int | None:
    """Index of the first field line of the forwarded header block."""
    for i, line in enumerate(lines):
        if _GMAIL_MARK.match(line) or _APPLE_MARK.match(line):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            return j
        if forward_subject and _OUTLOOK_MARK.match(line):
            return i + 1
        field = _FIELD.match(line) if forward_subject else None
        if field is not None and field[1].lower() == "from":
            # Outlook on the web writes the block without a rule above it.
            following = _FIELD.match(lines[i + 1]) if i + 1 < len(lines) else None
            if following is not None and following[1].lower() in {"sent", "date"}:
                return i
    return None


def _fields(lines: list[str], start: int) -> tuple[dict[str, str], int] | None:
    fields: dict[str, str] = {}
    last: str | None = None
    i = start
    while i < len(lines) and i - start < _HEADER_LIMIT:
        line = lines[i]
        if not line.strip():
            break
        match = _FIELD.match(line)
        if match:
            last = match[1].lower()
            fields.setdefault(last, match[2].strip())
        elif last in {"to", "cc"}:  # a wrapped address list
            fields[last] += " " + line.strip()
        else:
            break
        i += 1
    if "from" not in fields:
        return None
    return fields, i


def _addresses(value: str | None) -> list[ParsedAddress]:
    if not value:
        return []
    value = _MAILTO.sub(lambda m: f"<{m[1]}>", value)
    # Outlook separates addresses with ";".
    found: list[ParsedAddress] = []
    seen: set[str] = set()
    for name, addr in getaddresses([value.replace(";", ",")]):
        address = normalize_address(addr)
        if "@" not in address or address in seen:
            continue
        seen.add(address)
        found.append(ParsedAddress(address=address, name=name.strip().strip('"') or None))
    return found


def parse_forward_date(value: str | None, zone: timezone | None) -> datetime | None:
    if not value:
        return None
    text = re.sub(r"[\u202f\u00a0\s]+", " ", value).strip()
    # The mail clients' own formats first: RFC 5322's parser reads "10:15 PM" as 10:15.
    bare = _WEEKDAY.sub("", text).replace(" at ", " ")
    for fmt in _DATE_FORMATS:
        try:
            moment = datetime.strptime(bare, fmt)
        except ValueError:
            continue
        return moment.replace(tzinfo=zone or UTC).astimezone(UTC)
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone or UTC)
    return parsed.astimezone(UTC)


def inline_original(outer: ParsedMessage, zone: timezone | None) -> ParsedMessage | None:
    text = outer.body_text
    if not text:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    start = _block_start(lines, bool(_FORWARD_SUBJECT.match(outer.subject or "")))
    if start is None:
        return None
    found = _fields(lines, start)
    if found is None:
        return None
    fields, end = found
    senders = _addresses(fields.get("from"))
    if not senders:
        return None
    body = "\n".join(lines[end:]).strip() or None
    date = parse_forward_date(fields.get("date") or fields.get("sent"), zone)
    to, cc = _addresses(fields.get("to")), _addresses(fields.get("cc"))
    subject = fields.get("subject") or None
    original = replace(
        outer,
        message_id=None,
        subject=subject,
        sender=senders[0],
        to=to,
        cc=cc,
        bcc=[],
        date=date,
        in_reply_to=None,
        references=[],
        body_text=body,
        body_html=None,
        attachments=list(outer.attachments),
        headers={},
    )
    original.message_id = synthetic_message_id(original)
    return original


def synthetic_message_id(parsed: ParsedMessage) -> str:
    """R7 for an original without a Message-ID: the same forward twice is the same email."""
    parts = [
        parsed.sender.address if parsed.sender else "",
        ",".join(p.address for p in [*parsed.to, *parsed.cc]),
        parsed.date.isoformat() if parsed.date else "",
        parsed.subject or "",
        (parsed.body_text or "")[:2000],
    ]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    return f"<fwd-{digest}@capture.mailsync.invalid>"
