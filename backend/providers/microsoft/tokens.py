"""Access and refresh tokens of one Outlook mailbox, refreshed over plain HTTP.

The identity platform rotates refresh tokens: each refresh answers with a new one, which
must be stored at once: `on_rotate` hands it to the caller's credential store the moment it
is received (a crash after the refresh would otherwise leave only the old token stored).
`updated` still returns everything that changed, for the caller's final write.

One refresh at a time per mailbox in a process: callers that find the token lapsing wait
for the refresh under way and use its result (a per-mailbox lock, and the newest
credentials of the mailbox kept beside it); before refreshing, the stored credentials are
read again, since another process may have refreshed them. The platform does not revoke a
refresh token when it is used, so two processes refreshing at once both keep working.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from backend.providers.base import (
    AccessDenied,
    AccessRevoked,
    ProviderConfigurationError,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.providers.pacing import mailbox_lock, mailbox_state
from backend.settings import Settings

log = logging.getLogger(__name__)

SCOPES = ["offline_access", "Mail.ReadWrite", "Mail.Send", "User.Read"]
# Refresh a little before expiry, so a token never lapses in the middle of a pass.
EARLY = timedelta(seconds=60)

# The token endpoint's errors ("Microsoft Entra authentication and authorization error
# codes", learn.microsoft.com/entra/identity-platform/reference-error-codes, "Handling error
# codes in your application" and the AADSTS table; RFC 6749 section 5.2), by who can fix them.
# The AADSTS code, when the answer names one of these, decides before the OAuth name.
USER_MUST_SIGN_IN = {
    50076,  # MFA required by an administrator's policy: sign in interactively
    50078,  # the MFA proof expired
    50079,  # the user must enroll in MFA
    50132,  # session no longer valid (password changed or expired)
    50133,  # session invalid after a password change
    50173,  # the grant was revoked (password changed, sessions revoked): fresh sign-in needed
    54005,  # authorization code already redeemed
    65001,  # consent not (or no longer) given
    70008,  # the code or refresh token expired or was revoked
    700082,  # the refresh token expired from inactivity
}
USER_IS_REFUSED = {
    50053,  # account locked
    50057,  # account disabled
    50105,  # the user is not assigned to the app by their administrator
    53003,  # blocked by a Conditional Access policy
    65004,  # the user declined consent
}
OPERATOR_MUST_FIX = {
    700016,  # the app id is not registered in the directory
    7000215,  # invalid client secret
    7000222,  # the client secret expired
    70011,  # invalid scope
    500011,  # resource principal not found in the tenant
    700054,  # response_type not enabled for the app
}
# The OAuth error names: the user's to fix, an operator's, or worth retrying.
USER_ERRORS: dict[str, type[ProviderError]] = {
    "invalid_grant": AccessRevoked,
    "interaction_required": AccessRevoked,
    "consent_required": AccessRevoked,
    "login_required": AccessRevoked,
    "access_denied": AccessDenied,
}
TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error"}
OPERATOR_ERRORS = {
    "invalid_client",
    "unauthorized_client",
    "invalid_request",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_resource",
}


MICROSOFT_CLIENT_FIX = (
    "check MAILSYNC_MICROSOFT_CLIENT_ID / MAILSYNC_MICROSOFT_CLIENT_SECRET and the app's "
    "registration (an expired client secret needs a new one)"
)


def token_failure(status: int, body: dict[str, Any]) -> ProviderError:
    """The token endpoint's refusal, by who can fix it: the user (reconnect:
    ACCESS_REVOKED, or ACCESS_DENIED when they or their administrator block access), nobody
    (transient: retried) or the operator (configuration: logged, the user not blamed)."""
    name = str(body.get("error") or "")
    codes = {int(c) for c in body.get("error_codes") or [] if str(c).isdigit()}
    described = str(body.get("error_description") or "").splitlines()[0:1]
    detail = f"token endpoint: HTTP {status} {name} {sorted(codes)} {' '.join(described)}".strip()
    if status >= 500 or status == 429 or name in TRANSIENT_ERRORS:
        return TransientProviderError(detail)
    if codes & OPERATOR_MUST_FIX or (name in OPERATOR_ERRORS and not codes & USER_MUST_SIGN_IN):
        log.error(
            "the Microsoft identity platform refuses mailsync's app registration (%s): %s; "
            "mailboxes keep retrying and are not asked to reconnect",
            detail,
            MICROSOFT_CLIENT_FIX,
        )
        return ProviderConfigurationError(f"configuration: {detail}", MICROSOFT_CLIENT_FIX)
    if codes & USER_IS_REFUSED:
        return AccessDenied(detail)
    if codes & USER_MUST_SIGN_IN:
        return AccessRevoked(detail)
    kind = USER_ERRORS.get(name)
    if kind is not None:
        return kind(detail)
    # An answer none of the documents describe: not the user's fault as far as we know.
    log.error("unrecognised answer from the Microsoft token endpoint: %s", detail)
    return TransientProviderError(detail, SyncErrorCode.PROVIDER_UNAVAILABLE)


async def request_tokens(settings: Settings, form: dict[str, str]) -> dict[str, Any]:
    """POST to the token endpoint; refusals become the errors of `token_failure`."""
    form = {
        **form,
        "client_id": settings.microsoft_client_id,
        "client_secret": settings.microsoft_client_secret.get_secret_value(),
    }
    try:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            response = await http.post(settings.microsoft.token_url, data=form)
    except httpx.HTTPError as exc:
        raise TransientProviderError(f"token endpoint: {exc!r}") from exc
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200 or "access_token" not in body:
        raise token_failure(response.status_code, body)
    return body


def credentials_from(
    body: dict[str, Any], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    expires = datetime.now(UTC) + timedelta(seconds=int(body.get("expires_in", 3600)))
    return {
        **(previous or {}),
        "access_token": body["access_token"],
        "refresh_token": body.get("refresh_token") or (previous or {}).get("refresh_token"),
        "expires_at": expires.isoformat(),
        "scopes": str(body.get("scope", "")).split(),
    }


def _lapses(credentials: dict[str, Any], margin: timedelta) -> bool:
    expires = credentials.get("expires_at")
    if not expires or not credentials.get("access_token"):
        return True
    return datetime.fromisoformat(str(expires)) - margin <= datetime.now(UTC)


class TokenKeeper:
    def __init__(
        self,
        settings: Settings,
        credentials: dict[str, Any],
        on_rotate: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        *,
        mailbox_id: str | None = None,
        load: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = dict(credentials)
        self.on_rotate = on_rotate
        self.load = load
        self._key = mailbox_id or f"unshared:{id(self)}"
        self._changed = False
        self.refreshes = 0  # refreshes this keeper made itself

    def current(self) -> str:
        return str(self.credentials.get("access_token") or "")

    def _expired(self, margin: timedelta = EARLY) -> bool:
        return _lapses(self.credentials, margin)

    async def ensure_fresh(self, margin: timedelta = EARLY) -> None:
        """Refresh when the access token lapses within `margin`."""
        if self._expired(margin):
            await self.refresh(margin=margin)

    async def refresh(self, *, stale: str | None = None, margin: timedelta = EARLY) -> None:
        """A new access token, one refresh at a time per mailbox. `stale`: the access token a
        request was refused with (401); a newer one found meanwhile is used instead."""
        async with mailbox_lock(self._key):
            if self._adopt(mailbox_state(self._key).get("credentials"), stale, margin):
                return
            if self.load is not None and self._adopt(await self.load(), stale, margin):
                return
            await self._refresh()

    def _adopt(self, found: dict[str, Any] | None, stale: str | None, margin: timedelta) -> bool:
        """True when no refresh is needed: this keeper's token became good meanwhile (another
        caller refreshed it), or `found` (refreshed by another provider of the mailbox, or
        another process) is newer and good, and is taken."""
        if (stale is None or self.current() != stale) and not self._expired(margin):
            return True
        if not found or _lapses(found, margin):
            return False
        if found.get("access_token") in (stale, self.current()):
            return False
        self.credentials = {**self.credentials, **found}
        self._changed = True
        return True

    async def _refresh(self) -> None:
        refresh_token = self.credentials.get("refresh_token")
        if not refresh_token:
            raise AccessRevoked("no refresh token stored", SyncErrorCode.ACCESS_REVOKED)
        body = await request_tokens(
            self.settings,
            {
                "grant_type": "refresh_token",
                "refresh_token": str(refresh_token),
                "scope": " ".join(SCOPES),
            },
        )
        self.refreshes += 1
        self.credentials = credentials_from(body, self.credentials)
        self._changed = True
        mailbox_state(self._key)["credentials"] = dict(self.credentials)
        if self.on_rotate is not None:
            try:
                await self.on_rotate(dict(self.credentials))
            except Exception:
                # Still in memory: the caller's final write stores it, as before.
                log.exception("could not store refreshed Microsoft credentials at once")

    def remember(self, key: str, value: Any) -> None:
        """Provider state kept with the credentials (the Graph subscription id)."""
        if self.credentials.get(key) != value:
            self.credentials[key] = value
            self._changed = True

    def updated(self) -> dict[str, Any] | None:
        return dict(self.credentials) if self._changed else None
