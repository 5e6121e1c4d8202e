"""Which MailProvider serves a mailbox. Provider packages register themselves at import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backend.providers.base import (
    MailboxAccount,
    MailProvider,
    PermanentProviderError,
    Provider,
    SyncErrorCode,
)
from backend.settings import Settings

ProviderFactory = Callable[[MailboxAccount, dict[str, Any], Settings], MailProvider]

_factories: dict[Provider, ProviderFactory] = {}
_builtin_loaded = False


def _load_builtin() -> None:
    """Import the providers that ship with mailsync; each registers itself."""
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        import backend.providers.gmail
        import backend.providers.imap
        import backend.providers.microsoft  # noqa: F401


def register(provider: Provider, factory: ProviderFactory) -> None:
    _factories[provider] = factory


def unregister(provider: Provider) -> None:
    _factories.pop(provider, None)


def provider_for(
    provider: Provider, account: MailboxAccount, credentials: dict[str, Any], settings: Settings
) -> MailProvider:
    _load_builtin()
    factory = _factories.get(provider)
    if factory is None:
        raise PermanentProviderError(
            f"no {provider.value} provider is installed", SyncErrorCode.READ_FAILED
        )
    return factory(account, credentials, settings)


def factory_for(provider: Provider) -> ProviderFactory | None:
    _load_builtin()
    return _factories.get(provider)
