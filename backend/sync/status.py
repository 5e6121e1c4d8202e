"""R13: what each error code tells the user, and how retries back off."""

from __future__ import annotations

from datetime import timedelta

from backend.providers.base import SyncErrorCode

MESSAGES: dict[SyncErrorCode, tuple[str, str]] = {
    SyncErrorCode.ACCESS_DENIED: (
        "Access denied for this account.",
        "If your password changed or permissions were withdrawn, reconnect the mailbox and allow access.",
    ),
    SyncErrorCode.ACCESS_REVOKED: (
        "Email sync permission has been revoked for this account.",
        "Reconnect the mailbox and grant the requested permissions.",
    ),
    SyncErrorCode.MAILBOX_NOT_FOUND: (
        "Email is not enabled for this account.",
        "Check that the address is spelled right and hosted by the chosen provider.",
    ),
    SyncErrorCode.RATE_LIMITED: (
        "The provider is limiting requests for this account.",
        "Nothing to do: sync resumes automatically.",
    ),
    SyncErrorCode.PROVIDER_UNAVAILABLE: (
        "The provider could not be reached.",
        "Nothing to do: sync retries automatically.",
    ),
    SyncErrorCode.READ_FAILED: (
        "Unknown error reading email from provider, please check again later.",
        "Try again. If it persists, contact support.",
    ),
    SyncErrorCode.IMPORT_FAILED: (
        "Unknown error importing email, please try again later.",
        "Try again. If it persists, contact support.",
    ),
    SyncErrorCode.SEND_FAILED: (
        "An email could not be sent.",
        "Check the Sent folder of your mailbox before resending.",
    ),
}

SUSPEND_AFTER = timedelta(hours=48)
BACKOFF_BASE = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)


def backoff(consecutive_failures: int, retry_after: float | None = None) -> timedelta:
    """Exponential from 30 s to an hour; never sooner than the provider's Retry-After."""
    delay: timedelta = min(BACKOFF_BASE * (2 ** max(consecutive_failures - 1, 0)), BACKOFF_MAX)
    if retry_after is not None:
        delay = max(delay, timedelta(seconds=retry_after))
    return delay
