"""Gmail through google-api-python-client: `provider` syncs, `oauth` connects, `push` listens."""

from backend.providers.base import Provider
from backend.providers.gmail.oauth import GoogleConnector
from backend.providers.gmail.provider import GmailProvider
from backend.providers.oauth import register_connector
from backend.providers.registry import register

register(Provider.GMAIL, GmailProvider)
register_connector(Provider.GMAIL, GoogleConnector())
