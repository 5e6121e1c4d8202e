"""Google's OAuth 2.0 web-server flow for a Gmail mailbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import httpx

from backend.providers.base import (
    AccessRevoked,
    MailboxAccount,
    Provider,
    ProviderError,
    SyncErrorCode,
    TransientProviderError,
)
from backend.providers.gmail.client import SCOPES, credentials_dict
from backend.providers.gmail.provider import GmailProvider
from backend.providers.oauth import ConnectedAccount, OAuthConnector, callback_url
from backend.settings import Settings


class GoogleConnector(OAuthConnector):
    def authorization_url(self, settings: Settings, state: str, login_hint: str | None) -> str:
        params = {
            "client_id": settings.google_client_id,
            "redirect_uri": callback_url(settings, Provider.GMAIL),
            "response_type": "code",
            "scope": " ".join(SCOPES),
            # A refresh token, and the consent screen again so that one is always issued.
            "access_type": "offline",
            "prompt": "consent",
            "include_granted_scopes": "true",
            "state": state,
        }
        if login_hint:
            params["login_hint"] = login_hint
        return f"{settings.google.oauth_url}?{urlencode(params)}"

    async def complete(self, settings: Settings, code: str) -> ConnectedAccount:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": settings.google_client_id,
            "client_secret": settings.google_client_secret.get_secret_value(),
            "redirect_uri": callback_url(settings, Provider.GMAIL),
        }
        try:
            async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
                response = await http.post(settings.google.token_url, data=form)
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"token exchange: {exc!r}") from exc
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        if response.status_code >= 500:
            raise TransientProviderError(f"token exchange: HTTP {response.status_code}")
        if response.status_code != 200 or "access_token" not in body:
            raise AccessRevoked(
                f"token exchange refused: {body.get('error', response.status_code)}",
                SyncErrorCode.ACCESS_DENIED,
            )
        if not body.get("refresh_token"):
            raise ProviderError("Google issued no refresh token", SyncErrorCode.ACCESS_DENIED)
        granted = str(body.get("scope", "")).split()
        missing = [s for s in SCOPES if s not in granted]
        if missing:
            raise ProviderError(
                "not every permission was granted: " + ", ".join(missing),
                SyncErrorCode.ACCESS_DENIED,
            )
        credentials = credentials_dict(
            body["access_token"],
            body["refresh_token"],
            datetime.now(UTC) + timedelta(seconds=int(body.get("expires_in", 3600))),
            granted,
        )
        probe = GmailProvider(
            MailboxAccount(id="", email_address=""),
            credentials,
            settings,
        )
        try:
            profile = await probe.profile()
            addresses = await probe.own_addresses()
        finally:
            await probe.close()
        address = str(profile["emailAddress"]).lower()
        return ConnectedAccount(
            email_address=address,
            aliases=[a for a in addresses if a != address],
            credentials=probe.updated_credentials() or credentials,
            cursor={"historyId": str(profile["historyId"])},
        )
