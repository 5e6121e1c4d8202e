"""A msgraph-sdk client on a base URL from settings and a token from the mailbox.

Built from GraphClientFactory with msgraph's default options, which carry the `/me`
URL rewrite (without them the SDK sends `/users/me-token-to-replace/...`). The token
provider allows any host so the sandbox on 127.0.0.1 receives the bearer token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_http.middleware.options import RetryHandlerOption
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_request_adapter import options as GRAPH_DEFAULT_OPTIONS
from msgraph.graph_service_client import GraphServiceClient
from msgraph_core import GraphClientFactory


class _TokenProvider(AccessTokenProvider):
    def __init__(self, get_token: Callable[[], str]) -> None:
        self._get_token = get_token

    async def get_authorization_token(
        self, uri: str, additional_authentication_context: dict[str, Any] | None = None
    ) -> str:
        return self._get_token()

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return AllowedHostsValidator([])  # [] = every host


def warm_up() -> None:
    """Import what msgraph-sdk imports lazily the first time it reads a response.

    Its generated models import the types of their fields inside `get_field_deserializers`,
    so the first `User` read pulls in about 1,200 modules (seconds). Done at start-up, the
    first OAuth callback does not pay for it."""
    from msgraph.generated.models.message import Message
    from msgraph.generated.models.subscription import Subscription
    from msgraph.generated.models.user import User

    for model in (User, Message, Subscription):
        model().get_field_deserializers()


def build_graph_client(
    base_url: str, get_token: Callable[[], str], *, timeout: float = 30, retries: bool = True
) -> tuple[GraphServiceClient, httpx.AsyncClient]:
    """The SDK client and the httpx client under it (the caller closes the latter).

    `retries=False` turns off kiota's own retry of 429/503/504, for callers that decide
    themselves how long a pass may wait."""
    base_url = base_url.rstrip("/")
    options = dict(GRAPH_DEFAULT_OPTIONS)
    if not retries:
        options[RetryHandlerOption.get_key()] = RetryHandlerOption(max_retries=0)
    http = GraphClientFactory.create_with_default_middleware(
        client=httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False),
        options=options,
    )
    adapter = GraphRequestAdapter(
        BaseBearerTokenAuthenticationProvider(_TokenProvider(get_token)), client=http
    )
    adapter.base_url = base_url
    return GraphServiceClient(request_adapter=adapter), http
