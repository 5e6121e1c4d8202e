"""Access and refresh tokens of one Outlook mailbox, refreshed over plain HTTP.

The identity platform rotates refresh tokens: each refresh answers with a new one, which
must be stored at once: `on_rotate` hands it to the caller's credential store the moment it
is received (a crash after the refresh would otherwise leave only the old token stored).
`updated` still returns everything that changed, for the caller's final write.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from backend.providers.base import AccessRevoked, SyncErrorCode, TransientProviderError
from backend.settings import Settings

log = logging.getLogger(__name__)

SCOPES = ["offline_access", "Mail.ReadWrite", "Mail.Send", "User.Read"]
# Refresh a little before expiry, so a token never lapses in the middle of a pass.
EARLY = timedelta(seconds=60)


async def request_tokens(settings: Settings, form: dict[str, str]) -> dict[str, Any]:
    """POST to the token endpoint; AADSTS refusals become AccessRevoked."""
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
    if response.status_code >= 500 or response.status_code == 429:
        raise TransientProviderError(f"token endpoint: HTTP {response.status_code}")
    if response.status_code != 200 or "access_token" not in body:
        codes = body.get("error_codes") or []
        raise AccessRevoked(
            f"token endpoint refused: {body.get('error', response.status_code)} {codes}",
            SyncErrorCode.ACCESS_REVOKED
            if body.get("error") == "invalid_grant"
            else SyncErrorCode.ACCESS_DENIED,
        )
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


class TokenKeeper:
    def __init__(
        self,
        settings: Settings,
        credentials: dict[str, Any],
        on_rotate: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.credentials = dict(credentials)
        self.on_rotate = on_rotate
        self._changed = False

    def current(self) -> str:
        return str(self.credentials.get("access_token") or "")

    def _expired(self, margin: timedelta = EARLY) -> bool:
        expires = self.credentials.get("expires_at")
        if not expires or not self.current():
            return True
        return datetime.fromisoformat(str(expires)) - margin <= datetime.now(UTC)

    async def ensure_fresh(self, margin: timedelta = EARLY) -> None:
        """Refresh when the access token lapses within `margin`."""
        if self._expired(margin):
            await self.refresh()

    async def refresh(self) -> None:
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
        self.credentials = credentials_from(body, self.credentials)
        self._changed = True
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
