"""What a sync pass needs from a mail provider, and nothing more.

Fits Gmail (history ids, watch), Microsoft Graph (per-folder delta links, subscriptions)
and IMAP (UIDVALIDITY/UID, IDLE): the cursor is an opaque JSON object the provider owns.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol


class Provider(enum.StrEnum):
    """The kinds of mailbox mailsync connects to."""

    GMAIL = "GMAIL"
    MICROSOFT = "MICROSOFT"
    IMAP = "IMAP"


class SyncErrorCode(enum.StrEnum):
    """What went wrong with a mailbox, as its status shows it (R13 in docs/rules.md). Providers
    name the code of each failure; the sync engine adds IMPORT_FAILED for unreadable mail."""

    ACCESS_DENIED = "ACCESS_DENIED"
    ACCESS_REVOKED = "ACCESS_REVOKED"
    MAILBOX_NOT_FOUND = "MAILBOX_NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    SEND_FAILED = "SEND_FAILED"
    READ_FAILED = "READ_FAILED"
    IMPORT_FAILED = "IMPORT_FAILED"


@dataclass(frozen=True)
class MailboxAccount:
    """What an adapter knows of the mailbox it serves: no rows, no session."""

    id: str
    email_address: str


@dataclass(frozen=True)
class MessageRef:
    """A provider's handle on one message: Gmail id, Graph immutable id, IMAP `UIDVALIDITY:UID`."""

    provider_id: str
    thread_id: str | None = None


@dataclass
class ChangeSet:
    refs: list[MessageRef]
    # Saved only together with the mail it covers, or with the backlog of what is left of it
    # to file (in the same transaction).
    cursor: dict[str, Any]
    # The old cursor was too old (Gmail 404, Graph 410/syncStateNotFound, UIDVALIDITY change):
    # `refs` is a full re-list of mail since the connection, to be filed without duplicates.
    full_resync: bool = False


@dataclass
class FetchedMessage:
    ref: MessageRef
    raw: bytes  # RFC 5322
    thread_id: str | None = None
    labels: list[str] = field(default_factory=list)  # Gmail labels, Graph folder, IMAP folder
    internal_date: datetime | None = None


@dataclass
class SentMessage:
    """What the provider answered for a sent message. `provider_id` is "" when the provider
    accepted the message without naming it (Graph `sendMail` answers 202 with no body) and its
    Sent copy could not be found yet; the Sent copy then arrives through sync."""

    provider_id: str
    thread_id: str | None = None


@dataclass(frozen=True)
class SendLimits:
    """What one message may carry, as the provider documents it, so the product can refuse a
    message before queueing it. `max_bytes` is the size of the RFC 5322 message itself."""

    max_recipients: int  # To + Cc + Bcc addresses
    max_bytes: int


def bare_message_id(value: str) -> str:
    """An RFC 5322 Message-ID without its angle brackets or surrounding space."""
    return value.strip().removeprefix("<").removesuffix(">").strip()


class ProviderError(Exception):
    """A provider call failed; `code` is the R13 code the mailbox shows."""

    code: SyncErrorCode = SyncErrorCode.READ_FAILED

    def __init__(self, detail: str, code: SyncErrorCode | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class TransientProviderError(ProviderError):
    """Worth retrying: rate limits, timeouts, 5xx; `retry_after` is in seconds."""

    code = SyncErrorCode.PROVIDER_UNAVAILABLE

    def __init__(
        self, detail: str, code: SyncErrorCode | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(detail, code)
        self.retry_after = retry_after


class RateLimited(TransientProviderError):
    code = SyncErrorCode.RATE_LIMITED


class ProviderConfigurationError(TransientProviderError):
    """The provider refuses mailsync itself (an expired or wrong app secret, an app not
    registered, a bad scope): the operator must fix the settings, the user can do nothing.
    The mailbox shows PROVIDER_UNAVAILABLE and keeps retrying with backoff, never "reconnect";
    the operator learns of it from the log (an ERROR naming the setting) and from the
    mailbox's error entry, whose detail starts with "configuration:", and from `/readyz`,
    which lists the provider with `fix` until a mailbox that failed so syncs again."""

    def __init__(self, detail: str, fix: str, retry_after: float | None = None) -> None:
        super().__init__(detail, SyncErrorCode.PROVIDER_UNAVAILABLE, retry_after)
        # For the operator, not the user: which setting to check.
        self.fix = fix


class PermanentProviderError(ProviderError):
    """Retrying will not help until the user acts (reconnect, grant access, fix the address)."""


class AccessDenied(PermanentProviderError):
    code = SyncErrorCode.ACCESS_DENIED


class AccessRevoked(PermanentProviderError):
    code = SyncErrorCode.ACCESS_REVOKED


class MailboxNotFound(PermanentProviderError):
    code = SyncErrorCode.MAILBOX_NOT_FOUND


class CursorInvalid(PermanentProviderError):
    """The cursor cannot be used any more; the engine answers with a full re-list."""


class SendRejection(enum.StrEnum):
    """Why a provider refused to send a message (a documented limit, a bad recipient)."""

    DAILY_LIMIT = "DAILY_LIMIT"  # the mailbox's daily sending limit is used up
    TOO_MANY_RECIPIENTS = "TOO_MANY_RECIPIENTS"  # more recipients than one message may have
    TOO_LARGE = "TOO_LARGE"  # the message (or the request carrying it) is too big
    RECIPIENT_REJECTED = "RECIPIENT_REJECTED"  # an address the provider will not send to
    OTHER = "OTHER"


class SendRejected(PermanentProviderError):
    """The provider refused this message; sending it again as it is will not help.

    `retry_after` (seconds) is set when the provider said when sending works again (Gmail's
    daily limit); the message itself is not wrong then, but the product should not hold a
    send job for hours."""

    code = SyncErrorCode.SEND_FAILED

    def __init__(
        self,
        detail: str,
        reason: SendRejection = SendRejection.OTHER,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after = retry_after


class CredentialStore(Protocol):
    """Where a provider puts credentials it must not lose the moment it gets them (Microsoft
    rotates the refresh token on every refresh: the old one may stop working). Implemented on
    the sync side, which stores them in a transaction of their own; providers never see the
    database."""

    async def save(self, credentials: dict[str, Any]) -> None: ...

    async def load(self) -> dict[str, Any] | None:
        """The credentials stored now (another process may have refreshed them since this
        provider was built); None when they cannot be read at the moment."""
        ...


class MailProvider(abc.ABC):
    # Per-message limits; each provider sets its documented values.
    send_limits: ClassVar[SendLimits] = SendLimits(max_recipients=100, max_bytes=10 * 1024 * 1024)
    # Set by whoever runs the provider; None: changed credentials wait for
    # `updated_credentials` at the end.
    credential_store: CredentialStore | None = None

    async def prepare(self, seconds: float) -> None:  # noqa: B027 (optional hook)
        """Make the credentials good for the next `seconds` (refresh what would lapse), so
        that a caller can do it before opening a transaction; what changes goes to the
        `credential_store` at once."""

    @abc.abstractmethod
    async def own_addresses(self) -> list[str]:
        """The mailbox's address and its aliases (send-as, proxy addresses)."""

    @abc.abstractmethod
    async def list_changes(self, cursor: dict[str, Any] | None, since: datetime) -> ChangeSet:
        """New mail since `cursor`; with no cursor, everything received or sent since `since`."""

    @abc.abstractmethod
    async def fetch(self, refs: Sequence[MessageRef]) -> list[FetchedMessage | ProviderError]:
        """Raw messages for `refs`, in order; a per-message failure is returned, not raised."""

    @abc.abstractmethod
    async def send(self, raw: bytes, thread_id: str | None = None) -> SentMessage:
        """Send an RFC 5322 message through the mailbox as it is (every header, every part);
        it lands in its Sent folder. `thread_id` is the provider thread a reply belongs to.

        Raises `SendRejected` (with its `reason`) when the provider refuses the message for a
        documented limit or a bad recipient, `TransientProviderError` when it may work later
        (5xx, short rate limits), another `PermanentProviderError` (code SEND_FAILED unless
        the mailbox itself is at fault, e.g. ACCESS_REVOKED) otherwise."""

    async def find_sent(self, message_id: str) -> SentMessage | None:
        """The message of the mailbox whose RFC 5322 Message-ID is `message_id` (with or
        without angle brackets), or None. Used before re-sending, so that a send the provider
        accepted but whose answer was lost is not sent twice.

        The default finds nothing: a provider that cannot search must say so by overriding."""
        return None

    @abc.abstractmethod
    async def mark(self, provider_ids: Sequence[str], label: str) -> None:
        """Tag synced messages (Gmail label, Outlook category, IMAP keyword)."""

    async def subscribe(self) -> datetime | None:
        """Ask the provider to push news of this mailbox (Gmail watch, Graph subscription);
        the answer is when the registration lapses. None: this provider cannot push."""
        return None

    async def unsubscribe(self) -> None:  # noqa: B027 (optional hook)
        """Stop the pushes started by `subscribe`."""

    def updated_credentials(self) -> dict[str, Any] | None:
        """Credentials to store after the pass when they changed (a refreshed access token)."""
        return None

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections; most providers hold none between calls."""
