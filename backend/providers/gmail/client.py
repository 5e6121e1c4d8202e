"""google-api-python-client, set up for one mailbox and made safe to call from async code.

The bundled discovery document is built with `rootUrl` patched to the configured API URL:
moving only `api_endpoint` would leave uploads and /batch on Google's hosts. Calls block,
so they run in a thread; one client is used by one pass, one call at a time (httplib2 is not
thread-safe, sequential use from different threads is fine).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import googleapiclient
import httplib2
from google.auth.exceptions import RefreshError, TransportError
from google.oauth2.credentials import Credentials
from google_auth_httplib2 import AuthorizedHttp
from googleapiclient.discovery import Resource, build_from_document
from googleapiclient.errors import HttpError

from backend.providers.base import (
    AccessDenied,
    AccessRevoked,
    MailboxNotFound,
    PermanentProviderError,
    ProviderConfigurationError,
    ProviderError,
    RateLimited,
    SendRejected,
    SendRejection,
    SyncErrorCode,
    TransientProviderError,
)
from backend.providers.pacing import Backoff, mailbox_backoff
from backend.settings import Settings

log = logging.getLogger(__name__)

SCOPES = [
    "https://www.googleapis.com/auth/gmail.modify",  # read, label
    "https://www.googleapis.com/auth/gmail.send",
]
# Gmail's error guide: these 403s (and every 429) are quota, not permission; retry later.
RATE_REASONS = {
    "rateLimitExceeded",
    "userRateLimitExceeded",
    "dailyLimitExceeded",
    "quotaExceeded",
    "RATE_LIMIT_EXCEEDED",  # google.rpc.ErrorInfo
    "RESOURCE_EXHAUSTED",
}
# A token without the scopes mailsync asked for: the user must grant them again.
SCOPE_REASONS = {"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"}
INLINE_RETRIES = 2
# Gmail's batching guide: at most 100 calls per batch, and more than 50 is discouraged
# (large batches trigger rate limiting); the batch size adapts below this.
MAX_BATCH = 50


@functools.cache
def _bundled_document() -> dict[str, Any]:
    path = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "gmail.v1.json"
    document: dict[str, Any] = json.loads(path.read_text())
    return document


@functools.cache
def _document(root_url: str) -> dict[str, Any]:
    document = copy.deepcopy(_bundled_document())
    document["rootUrl"] = document["mtlsRootUrl"] = root_url.rstrip("/") + "/"
    return document


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def unb64url(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def error_reasons(exc: HttpError) -> set[str]:
    """Every reason Google's error body names: `error.errors[].reason` (the catalogue of
    Gmail's error guide) and the `google.rpc.ErrorInfo` reasons under `error.details`.
    Read from the body itself: the client keeps only one of the two lists."""
    reasons: set[str] = set()
    try:
        data = json.loads(exc.content.decode("utf-8", errors="replace"))
    except (ValueError, AttributeError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        for key in ("errors", "details"):
            entries = error.get(key)
            if isinstance(entries, list):
                reasons.update(
                    str(e["reason"]) for e in entries if isinstance(e, dict) and e.get("reason")
                )
    details = exc.error_details
    if isinstance(details, list):
        reasons.update(str(e["reason"]) for e in details if isinstance(e, dict) and e.get("reason"))
    return reasons


def error_reason(exc: HttpError) -> str | None:
    """The catalogue reason (`errors[0].reason`), else any reason the body names."""
    try:
        data = json.loads(exc.content.decode("utf-8", errors="replace"))
        first = data["error"]["errors"][0]["reason"]
        if first:
            return str(first)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):
        pass
    reasons = error_reasons(exc)
    return min(reasons) if reasons else None


def retry_after(exc: HttpError) -> float | None:
    value = exc.resp.get("retry-after") if exc.resp is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def translate(exc: HttpError, *, what: str) -> ProviderError:
    """Gmail's answer in terms of the R13 codes."""
    status = exc.status_code
    reason = error_reason(exc)
    reasons = error_reasons(exc)
    detail = f"{what}: HTTP {status} {reason or ''} {exc.reason}".strip()
    if status == 429 or (status == 403 and reasons & RATE_REASONS):
        wait = retry_after(exc)
        if "dailyLimitExceeded" in reasons and wait is None:
            wait = 3600.0  # the project's daily quota: no point retrying within the hour
        return RateLimited(detail, retry_after=wait)
    if status == 401:
        return AccessDenied(detail)
    if status == 403 and reasons & SCOPE_REASONS:
        return AccessRevoked(detail)
    if status == 403:  # domainPolicy (an administrator disabled Gmail apps), forbidden
        return AccessDenied(detail)
    if status == 400 and reason == "failedPrecondition":
        return MailboxNotFound(detail)
    if status >= 500 or status == 408:
        return TransientProviderError(detail, retry_after=retry_after(exc))
    return ProviderError(detail, SyncErrorCode.READ_FAILED)


def send_failure(exc: HttpError, *, what: str) -> ProviderError:
    """Gmail's refusal of a `messages.send`, as a `SendRejected` when it is about the message.

    Documented (developers.google.com/workspace/gmail/api/guides/handle-errors): the daily
    sending limit answers 429 "User-rate limit exceeded" "(Mail sending)" with a time to
    retry; other 429/403 rate limits are per-minute quota and stay transient. A message over
    the upload limit answers 413; a 400 names a bad or excessive recipient list."""
    status = exc.status_code
    reason = error_reason(exc) or ""
    message = str(exc.reason or "")
    lowered = message.lower()
    detail = f"{what}: HTTP {status} {reason} {message}".strip()
    if status in (403, 429) and "mail sending" in lowered:
        return SendRejected(detail, SendRejection.DAILY_LIMIT, retry_after=retry_after(exc))
    if status == 413 or reason in ("uploadTooLarge", "messageTooLarge"):
        return SendRejected(detail, SendRejection.TOO_LARGE)
    if status == 400:
        if "recipient" in lowered and any(
            word in lowered for word in ("too many", "maximum", "limit", "exceed")
        ):
            return SendRejected(detail, SendRejection.TOO_MANY_RECIPIENTS)
        if "too large" in lowered or "size" in lowered:
            return SendRejected(detail, SendRejection.TOO_LARGE)
        if "recipient" in lowered or "to header" in lowered or "address" in lowered:
            return SendRejected(detail, SendRejection.RECIPIENT_REJECTED)
        return SendRejected(detail, SendRejection.OTHER)
    error = translate(exc, what=what)
    if isinstance(error, (TransientProviderError, PermanentProviderError)):
        return error
    return PermanentProviderError(error.detail, SyncErrorCode.SEND_FAILED)


GOOGLE_CLIENT_FIX = (
    "check MAILSYNC_GOOGLE_CLIENT_ID / MAILSYNC_GOOGLE_CLIENT_SECRET (the OAuth client in the "
    "Google Cloud console)"
)


def refresh_failure(exc: RefreshError, *, what: str) -> ProviderError:
    """Google's token endpoint refusing a refresh (RFC 6749 section 5.2 errors): the OAuth
    client itself refused is the operator's to fix, a refused grant the user's."""
    text = str(exc)
    if "invalid_client" in text or "unauthorized_client" in text:
        log.error(
            "Google refuses mailsync's OAuth client (%s): %s; mailboxes keep retrying and are "
            "not asked to reconnect",
            text,
            GOOGLE_CLIENT_FIX,
        )
        return ProviderConfigurationError(f"configuration: {what}: {text}", GOOGLE_CLIENT_FIX)
    if "invalid_grant" in text or not getattr(exc, "retryable", True):
        return AccessRevoked(f"{what}: {text}")
    return TransientProviderError(f"{what}: {text}")


def give_up(error: ProviderError, pace: Backoff) -> RateLimited:
    """The per-user quota kept refusing through waits up to the cap: the pass ends, its
    progress kept, and the next one starts after another wait of the same length."""
    return RateLimited(
        f"{error.detail} (still refused after {pace.failures} waits)",
        retry_after=pace.next_delay(),
    )


class GmailClient:
    def __init__(
        self, settings: Settings, credentials: dict[str, Any], mailbox_id: str | None = None
    ) -> None:
        endpoints = settings.google
        # Quota is per user: every client of this mailbox in the process paces together.
        self._pace_key = mailbox_id or f"unshared:{id(self)}"
        expiry = credentials.get("expiry")
        self.creds = Credentials(  # type: ignore[no-untyped-call]
            token=credentials.get("access_token"),
            refresh_token=credentials.get("refresh_token"),
            token_uri=endpoints.token_url,
            client_id=settings.google_client_id,
            client_secret=settings.google_client_secret.get_secret_value(),
            scopes=credentials.get("scopes") or SCOPES,
            # google-auth compares naive UTC datetimes.
            expiry=datetime.fromisoformat(expiry).astimezone(UTC).replace(tzinfo=None)
            if expiry
            else None,
        )
        self._issued_token = self.creds.token
        self.http = AuthorizedHttp(self.creds, http=httplib2.Http(timeout=30, proxy_info=None))
        self.service: Resource = build_from_document(_document(endpoints.api_url), http=self.http)
        self.inline_wait = settings.provider_inline_wait_seconds

    @property
    def users(self) -> Any:
        return self.service.users()

    @property
    def pace(self) -> Backoff:
        return mailbox_backoff("gmail", self._pace_key, lambda: Backoff(max_batch=MAX_BATCH))

    async def execute(
        self,
        build: Callable[[], Any],
        *,
        what: str,
        retries: int = INLINE_RETRIES,
        translator: Callable[..., ProviderError] = translate,
    ) -> Any:
        """Run one API call, waiting out rate limits and blips inside the pass.

        A quota refusal (no Retry-After, as Gmail sends them) is retried after the mailbox's
        shared backoff until the waits reach the cap; one with a Retry-After is waited out
        when that is short. `retries=0` for calls that must not be repeated blindly (a send
        the provider may have accepted before the answer failed)."""
        attempt = 0
        while True:
            await self.pace.wait()
            try:
                result = await asyncio.to_thread(lambda: build().execute(num_retries=0))
            except HttpError as exc:
                error = translator(exc, what=what)
            except RefreshError as exc:
                raise refresh_failure(exc, what=what) from exc
            except (httplib2.HttpLib2Error, TransportError, OSError, TimeoutError) as exc:
                error = TransientProviderError(f"{what}: {exc!r}")
            else:
                if self.pace.failures:
                    self.pace.succeeded()
                return result
            if isinstance(error, RateLimited) and self.short_wait(error):
                self.pace.rate_limited(error.retry_after)
                if retries == 0:
                    raise error
                if self.pace.exhausted:
                    raise give_up(error, self.pace) from error
                continue
            if not isinstance(error, TransientProviderError) or attempt >= retries:
                raise error
            if not self.short_wait(error):
                raise error
            await asyncio.sleep(error.retry_after if error.retry_after is not None else attempt + 1)
            attempt += 1

    def short_wait(self, error: TransientProviderError) -> bool:
        """No Retry-After (quota), or one short enough to wait out inside the pass."""
        return error.retry_after is None or error.retry_after <= self.inline_wait

    async def batch_get(
        self, ids: list[str], **params: Any
    ) -> dict[str, dict[str, Any] | HttpError]:
        """messages.get for many ids in one HTTP request (Gmail allows 100; callers send at
        most `pace.batch_size`, ≤ 50). Each call answers on its own: the results hold an
        HttpError for each refused one."""
        results: dict[str, dict[str, Any] | HttpError] = {}

        def run() -> None:
            batch = self.service.new_batch_http_request()
            for message_id in ids:
                batch.add(
                    self.users.messages().get(userId="me", id=message_id, **params),
                    request_id=message_id,
                    callback=lambda rid, response, exc: results.__setitem__(rid, exc or response),
                )
            batch.execute()

        try:
            await asyncio.to_thread(run)
        except HttpError as exc:
            raise translate(exc, what="messages.get batch") from exc
        except RefreshError as exc:
            raise refresh_failure(exc, what="messages.get batch") from exc
        except (httplib2.HttpLib2Error, TransportError, OSError, TimeoutError) as exc:
            raise TransientProviderError(f"messages.get batch: {exc!r}") from exc
        return results

    def refreshed_credentials(self) -> dict[str, Any] | None:
        """The credentials to store if google-auth refreshed the access token."""
        if self.creds.token == self._issued_token:
            return None
        return credentials_dict(
            self.creds.token,
            self.creds.refresh_token,
            self.creds.expiry.replace(tzinfo=UTC) if self.creds.expiry else None,
            list(self.creds.scopes or SCOPES),
        )

    def close(self) -> None:
        for connection in self.http.http.connections.values():
            connection.close()


def credentials_dict(
    access_token: str | None, refresh_token: str | None, expiry: datetime | None, scopes: list[str]
) -> dict[str, Any]:
    return {
        "access_token": access_token,
        "refresh_token": refresh_token,
        "expiry": expiry.isoformat() if expiry else None,
        "scopes": scopes,
    }
