"""The MIME of CRM-sent mail, built with the standard `email` package: what is sent is what
the user wrote (the timeline stores a sanitized copy, parsed back from these very bytes)."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

import nh3

_BLOCK_END = re.compile(r"</(p|div|li|h[1-6]|tr|blockquote)\s*>|<br\s*/?>", re.IGNORECASE)
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(\s*\n)+")
_SPACES = re.compile(r"[ \t]+")


@dataclass
class Draft:
    sender_name: str | None
    sender_address: str
    to: Sequence[str]
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    subject: str = ""
    body_text: str | None = None
    body_html: str | None = None
    in_reply_to: str | None = None
    references: Sequence[str] = field(default_factory=list)


def new_message_id(sender_address: str) -> str:
    """Ours, under the sender's domain, so replies name it and R7 recognises the Sent copy."""
    domain = sender_address.rpartition("@")[2] or "mailsync.invalid"
    # Short enough that the header is never folded onto a second line.
    return f"<{uuid.uuid4().hex}@{domain}>"


def text_of_html(value: str) -> str:
    """A plain-text part for mail written only in HTML: blocks become lines, tags go."""
    marked = _BLOCK_END.sub(lambda m: m.group(0) + "\n", value)
    stripped = nh3.clean(
        marked, tags=set(), clean_content_tags={"script", "style", "head", "title"}
    )
    lines = [_SPACES.sub(" ", line).strip() for line in html.unescape(stripped).splitlines()]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def _address(value: str, name: str | None = None) -> Address:
    local, _, domain = value.rpartition("@")
    return Address(display_name=name or "", username=local, domain=domain)


def compose(draft: Draft, *, message_id: str, date: datetime) -> bytes:
    message = EmailMessage(policy=SMTP)
    # A display name is one line, whatever the user's profile holds.
    name = " ".join((draft.sender_name or "").split())
    message["From"] = _address(draft.sender_address, name)
    message["To"] = [_address(a) for a in draft.to] if draft.to else []
    if draft.cc:
        message["Cc"] = [_address(a) for a in draft.cc]
    if draft.bcc:
        # The provider delivers to Bcc and drops the header from what recipients get.
        message["Bcc"] = [_address(a) for a in draft.bcc]
    message["Subject"] = draft.subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    if draft.in_reply_to:
        message["In-Reply-To"] = draft.in_reply_to
    if draft.references:
        message["References"] = " ".join(draft.references)
    text = draft.body_text
    if text is None and draft.body_html is not None:
        text = text_of_html(draft.body_html)
    message.set_content(text or "")
    if draft.body_html is not None:
        message.add_alternative(draft.body_html, subtype="html")
    return message.as_bytes()
