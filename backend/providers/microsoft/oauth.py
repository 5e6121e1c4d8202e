"""The Microsoft identity platform's authorization-code flow for an Outlook mailbox."""

from __future__ import annotations

from urllib.parse import urlencode

from backend.providers.base import MailboxAccount, Provider, ProviderError, SyncErrorCode
from backend.providers.microsoft.provider import MicrosoftProvider
from backend.providers.microsoft.tokens import SCOPES, credentials_from, request_tokens
from backend.providers.oauth import ConnectedAccount, OAuthConnector, callback_url
from backend.settings import Settings

REQUIRED = {"mail.readwrite", "mail.send"}


class MicrosoftConnector(OAuthConnector):
    def authorization_url(self, settings: Settings, state: str, login_hint: str | None) -> str:
        params = {
            "client_id": settings.microsoft_client_id,
            "response_type": "code",
            "redirect_uri": callback_url(settings, Provider.MICROSOFT),
            "response_mode": "query",
            "scope": " ".join(SCOPES),
            "state": state,
            "prompt": "select_account",
        }
        if login_hint:
            params["login_hint"] = login_hint
        return f"{settings.microsoft.authorize_url}?{urlencode(params)}"

    async def complete(self, settings: Settings, code: str) -> ConnectedAccount:
        body = await request_tokens(
            settings,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": callback_url(settings, Provider.MICROSOFT),
                "scope": " ".join(SCOPES),
            },
        )
        if not body.get("refresh_token"):
            raise ProviderError("Microsoft issued no refresh token", SyncErrorCode.ACCESS_DENIED)
        granted = {s.lower() for s in str(body.get("scope", "")).split()}
        missing = sorted(REQUIRED - granted)
        if missing:
            raise ProviderError(
                "not every permission was granted: " + ", ".join(missing),
                SyncErrorCode.ACCESS_DENIED,
            )
        credentials = credentials_from(body)
        probe = MicrosoftProvider(
            MailboxAccount(id="", email_address=""),
            credentials,
            settings,
        )
        try:
            me = await probe.me()
            addresses = await probe.own_addresses()
        finally:
            await probe.close()
        address = str(me.mail or me.user_principal_name or "").lower()
        return ConnectedAccount(
            email_address=address,
            aliases=[a for a in addresses if a != address],
            credentials=probe.updated_credentials() or credentials,
            # Sync starts with a delta of mail received since the connection (R6).
            cursor=None,
        )
