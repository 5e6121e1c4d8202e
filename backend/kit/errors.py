"""Failures a user can fix. Services raise them; the entry points turn them into userErrors
(GraphQL) or an `error=` redirect parameter (the OAuth callback).

`ErrorCode` is the one catalogue of their codes: each has one meaning, listed in the schema's
description of `UserError.code` and in docs/errors.md."""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ErrorCode(enum.StrEnum):
    def __new__(cls, value: str, meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    meaning: str

    # Input
    INVALID_ARGUMENT = "INVALID_ARGUMENT", "An argument is out of its allowed range."
    INVALID_CURSOR = "INVALID_CURSOR", "The `after` cursor was not issued by this API."
    INVALID_EMAIL = "INVALID_EMAIL", "Not a deliverable email address."
    INVALID_DOMAIN = "INVALID_DOMAIN", "Not a valid domain name."
    INVALID_NAME = "INVALID_NAME", "A name is empty or too long."
    INVALID_TEXT = (
        "INVALID_TEXT",
        "Text holds a character that cannot be stored (NUL, an unpaired surrogate).",
    )
    INVALID_LIMIT = "INVALID_LIMIT", "A workspace limit must be a positive number (or none)."
    # Requests (GraphQL errors' `extensions.code`, not userErrors)
    BAD_REQUEST = "BAD_REQUEST", "The HTTP request is not a GraphQL request this API can run."
    QUERY_TOO_DEEP = "QUERY_TOO_DEEP", "The query nests deeper than the server allows."
    TOO_MANY_ALIASES = "TOO_MANY_ALIASES", "The query uses more aliases than the server allows."
    QUERY_TOO_LARGE = (
        "QUERY_TOO_LARGE",
        "The query is longer, or has more tokens, than the server allows.",
    )
    REQUEST_TOO_LARGE = (
        "REQUEST_TOO_LARGE",
        "The request body is larger than the server accepts (HTTP 413).",
    )
    # Objects
    NOT_FOUND = "NOT_FOUND", "No such object in your workspace (or not one you may manage)."
    FORBIDDEN = "FORBIDDEN", "Your role does not allow this."
    DUPLICATE_USER = "DUPLICATE_USER", "A user with this address already exists."
    DUPLICATE_EMAIL = "DUPLICATE_EMAIL", "Another contact already has this address."
    TOO_MANY_ADDRESSES = "TOO_MANY_ADDRESSES", "A contact has at most 50 email addresses."
    ALREADY_EXCLUDED = "ALREADY_EXCLUDED", "This address or domain is already excluded."
    PUBLIC_SUFFIX = (
        "PUBLIC_SUFFIX",
        "A public suffix (com, co.uk) cannot be excluded; name a domain under it.",
    )
    # Filing
    ALREADY_FILED = "ALREADY_FILED", "The email is already on that contact's timeline."
    NOT_FILED = "NOT_FILED", "The email is not on that contact's timeline."
    SAME_CONTACT = "SAME_CONTACT", "Moving an email needs two different contacts."
    # Mailboxes
    ALREADY_CONNECTED = "ALREADY_CONNECTED", "This mailbox is already connected."
    LIMIT_REACHED = "LIMIT_REACHED", "The workspace is at its mailbox limit (R13 PENDING_LIMIT)."
    MAILBOX_DISCONNECTED = "MAILBOX_DISCONNECTED", "The mailbox is disconnected; connect it again."
    MAILBOX_SUSPENDED = "MAILBOX_SUSPENDED", "Sync is suspended after 48 hours of failures."
    UNSUPPORTED_PROVIDER = "UNSUPPORTED_PROVIDER", "mailsync cannot connect this kind of mailbox."
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED", "Part of the API that this version does not offer yet."
    # Sending from the CRM (R15)
    NOT_MAILBOX_OWNER = "NOT_MAILBOX_OWNER", "Only the mailbox's owner sends from it."
    NO_RECIPIENTS = "NO_RECIPIENTS", "An email needs at least one recipient."
    TOO_MANY_RECIPIENTS = "TOO_MANY_RECIPIENTS", "More recipients than the provider takes at once."
    SUBJECT_TOO_LONG = "SUBJECT_TOO_LONG", "The subject is longer than 998 characters."
    BODY_TOO_LARGE = "BODY_TOO_LARGE", "The body is larger than mailsync sends (5 MB)."
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE", "The message is larger than the provider accepts."
    SEND_LIMIT_REACHED = "SEND_LIMIT_REACHED", "The mailbox reached its provider's sending limit."
    RECIPIENT_REJECTED = "RECIPIENT_REJECTED", "The provider refused a recipient."
    SEND_FAILED = "SEND_FAILED", "The provider refused the message for another reason."
    # Connecting through a provider's consent screen
    INVALID_REQUEST = "INVALID_REQUEST", "The provider's answer lacks its code or state."
    INVALID_STATE = "INVALID_STATE", "The sign-in link expired or was not issued by mailsync."
    ACCESS_DENIED = "ACCESS_DENIED", "The provider or the user refused access to the mailbox."
    ACCESS_REVOKED = "ACCESS_REVOKED", "The provider says the grant was revoked; sign in again."
    MAILBOX_NOT_FOUND = "MAILBOX_NOT_FOUND", "The account has no mailbox the provider will serve."
    RATE_LIMITED = "RATE_LIMITED", "The provider asked us to slow down; try again shortly."
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE", "The provider is unreachable; try again."
    PROVIDER_ERROR = "PROVIDER_ERROR", "The provider answered with an error of its own."
    # Connecting an IMAP/SMTP mailbox
    AUTH_FAILED = "AUTH_FAILED", "The mail server refused the user name or password."
    HOST_UNREACHABLE = "HOST_UNREACHABLE", "The mail server could not be reached at that port."
    TLS_FAILED = "TLS_FAILED", "A secure connection could not be made (certificate, TLS, STARTTLS)."
    NOT_IMAP = "NOT_IMAP", "Something answers at that host and port, but not an IMAP/SMTP server."
    HOST_NOT_ALLOWED = (
        "HOST_NOT_ALLOWED",
        "The host resolves to a private, loopback or link-local address, refused here.",
    )


def catalogue() -> str:
    """`CODE: meaning` lines, for the schema's description and the docs."""
    return "\n".join(f"{code.value}: {code.meaning}" for code in ErrorCode)


class ServiceError(Exception):
    def __init__(self, code: ErrorCode, message: str, field: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = list(field) if field is not None else None


class ServiceErrors(ServiceError):
    """Several problems with one input (each bad address of an email, say), reported together."""

    def __init__(self, errors: Sequence[ServiceError]) -> None:
        super().__init__(errors[0].code, errors[0].message, errors[0].field)
        self.errors = list(errors)


def in_range(name: str, value: int, low: int, high: int) -> int:
    """`value` when `low <= value <= high`; otherwise an INVALID_ARGUMENT error naming `name`."""
    if not low <= value <= high:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT, f"`{name}` must be between {low} and {high}.", [name]
        )
    return value


class NotFound(ServiceError):
    def __init__(self, what: str, field: Sequence[str] | None = None) -> None:
        super().__init__(ErrorCode.NOT_FOUND, f"{what} not found.", field)


class Forbidden(ServiceError):
    def __init__(self, message: str = "You are not allowed to do this.") -> None:
        super().__init__(ErrorCode.FORBIDDEN, message)
