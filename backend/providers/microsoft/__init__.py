"""Microsoft 365 / Outlook through msgraph-sdk: `provider` syncs, `oauth` connects,
`notifications` handles Graph's webhooks."""

from backend.providers.base import Provider
from backend.providers.microsoft.oauth import MicrosoftConnector
from backend.providers.microsoft.provider import MicrosoftProvider
from backend.providers.oauth import register_connector
from backend.providers.registry import register

register(Provider.MICROSOFT, MicrosoftProvider)
register_connector(Provider.MICROSOFT, MicrosoftConnector())
