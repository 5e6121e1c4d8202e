"""The provider sandbox on a real port, and the real Google client pointed at it."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httplib2
import uvicorn
from google.oauth2.credentials import Credentials
from google_auth_httplib2 import AuthorizedHttp
from googleapiclient.discovery import build_from_document

from backend.providers.gmail.client import _document
from backend.providers.microsoft.client import build_graph_client
from backend.sandbox.app import create_sandbox_app
from backend.sandbox.google import GoogleSandbox
from backend.sandbox.microsoft import MicrosoftSandbox


class SandboxServer:
    def __init__(self, google: GoogleSandbox, port: int) -> None:
        self.google = google
        self.port = port
        app = create_sandbox_app(google)
        self.microsoft: MicrosoftSandbox = app.state.microsoft
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=1,
            )
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task

    def graph(self, address: str, scopes: list[str] | None = None) -> tuple[Any, Any]:
        """The real msgraph-sdk acting as the account's owner; close the second item."""
        token = self.microsoft.mint_token(address, scopes)
        return build_graph_client(self.url + "/v1.0", lambda: token)

    def gmail(self, address: str, scopes: list[str] | None = None) -> Any:
        """The real google-api-python-client, acting as the account's owner (or its mail
        app): what a person does in Gmail, done through the API."""
        token = self.google.mint_token(address, scopes)
        creds = Credentials(token=token)  # type: ignore[no-untyped-call]
        http = AuthorizedHttp(creds, http=httplib2.Http(timeout=30, proxy_info=None))
        return build_from_document(_document(self.url + "/"), http=http)


def raw_b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


async def call(request: Any) -> Any:
    """Blocking client calls run in a thread: the sandbox answers on this event loop."""
    return await asyncio.to_thread(request.execute)
