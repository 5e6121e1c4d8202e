"""How a mailbox is connected through an OAuth provider's consent screen."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from backend.providers.base import Provider
from backend.settings import Settings


@dataclass
class ConnectedAccount:
    email_address: str
    aliases: list[str]
    credentials: dict[str, Any]
    # Where sync starts: the provider's position at connection time (R6).
    cursor: dict[str, Any] | None


class OAuthConnector(abc.ABC):
    @abc.abstractmethod
    def authorization_url(self, settings: Settings, state: str, login_hint: str | None) -> str:
        """The consent screen the user's browser is sent to."""

    @abc.abstractmethod
    async def complete(self, settings: Settings, code: str) -> ConnectedAccount:
        """Exchange the code from the callback and read who the account is."""


_connectors: dict[Provider, OAuthConnector] = {}


def register_connector(provider: Provider, connector: OAuthConnector) -> None:
    _connectors[provider] = connector


def connector_for(provider: Provider) -> OAuthConnector | None:
    from backend.providers.registry import _load_builtin

    _load_builtin()
    return _connectors.get(provider)


# The path segment of each provider's OAuth callback: /oauth/<segment>/callback.
CALLBACK_SEGMENTS = {Provider.GMAIL: "google", Provider.MICROSOFT: "microsoft"}


def callback_url(settings: Settings, provider: Provider) -> str:
    return f"{settings.public_url.rstrip('/')}/oauth/{CALLBACK_SEGMENTS[provider]}/callback"


def provider_of_segment(segment: str) -> Provider | None:
    return next((p for p, s in CALLBACK_SEGMENTS.items() if s == segment), None)
