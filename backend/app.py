"""The ASGI application: GraphQL over HTTP and websockets, GraphiQL, health checks."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import (
    GRAPHQL_TRANSPORT_WS_PROTOCOL,
    GRAPHQL_WS_PROTOCOL,
    MULTIPART_SUBSCRIPTION_PROTOCOL,
)
from strawberry.types.unset import UnsetType

from backend import graphiql
from backend.api import http as routes
from backend.api.fanout import FanoutTransportWSHandler, FanoutWSHandler
from backend.api.over_http import GraphQLOverHTTP
from backend.api.schema import build_schema, document_limits
from backend.auth.service import authenticate
from backend.auth.tokens import bearer_value
from backend.db import read_only
from backend.graphql.context import Context
from backend.kit.errors import ErrorCode
from backend.mailboxes.queries import provider_issues
from backend.providers.microsoft.client import warm_up as warm_up_graph_sdk
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings, configure_logging, get_settings

log = logging.getLogger(__name__)


class MailsyncGraphQL(GraphQLOverHTTP):
    # Their subscriptions go through the fan-out (api/fanout.py).
    graphql_transport_ws_handler_class = FanoutTransportWSHandler
    graphql_ws_handler_class = FanoutWSHandler

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            build_schema(settings),
            # Off in production unless MAILSYNC_GRAPHIQL says otherwise (a GET is then a 404).
            graphql_ide="graphiql" if settings.graphiql_enabled else None,
            keep_alive=True,
            subscription_protocols=(
                GRAPHQL_TRANSPORT_WS_PROTOCOL,
                GRAPHQL_WS_PROTOCOL,
                # Apollo's multipart subscriptions: `Accept: multipart/mixed;subscriptionSpec=1.0`
                MULTIPART_SUBSCRIPTION_PROTOCOL,
            ),
            # Pages on these origins may open the websocket (same-origin ones always may).
            allowed_origins=settings.allowed_origins,
        )
        self.document_limits = document_limits(settings)
        self.runtime: Runtime | None = None

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise RuntimeError("the application has not started")
        return self.runtime

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        runtime = self._runtime()
        viewer = None
        if isinstance(request, Request):
            token = bearer_value(request.headers.get("authorization"))
            if token:
                async with runtime.db.sessionmaker() as session:
                    read_only(session)
                    viewer = await authenticate(session, runtime.settings.secret, token)
        return Context(runtime, viewer, request)

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        header = params.get("Authorization") or params.get("authorization")
        token = bearer_value(header) if isinstance(header, str) else None
        runtime = self._runtime()
        async with runtime.db.sessionmaker() as session:
            read_only(session)
            context.viewer = await authenticate(session, runtime.settings.secret, token)
        if context.viewer is None:
            raise ConnectionRejectionError(
                {"code": "UNAUTHENTICATED", "message": "a valid bearer token is required"}
            )
        return None

    async def render_graphql_ide(self, request: Request) -> HTMLResponse:
        return HTMLResponse(graphiql.page())


def websocket_options(settings: Settings) -> dict[str, Any]:
    """Uvicorn's websocket configuration, for `mailsync serve` and the tests' servers alike."""
    return {
        "ws": "websockets-sansio",
        # A websocket message is held to the same size as a request body (uvicorn: 16 MiB).
        "ws_max_size": settings.max_request_bytes,
        # Uvicorn's default is on, at about 42 KB per connection (docs/performance.md).
        "ws_per_message_deflate": settings.ws_per_message_deflate,
    }


# A refused body up to this many times its limit is read and dropped before the 413.
DRAIN_FACTOR = 4


class _BodyTooLarge(Exception):
    """Raised from `receive` once a body outgrows its limit (not a ValueError, so that no
    route's JSON error handling swallows it)."""


class BodySizeLimit:
    """Answers 413 (`REQUEST_TOO_LARGE`) to a request whose body is larger than its route
    takes: at once when Content-Length says so, else as soon as the chunks read outgrow it,
    so no route reads, decodes or parses more than the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_webhook_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_webhook_bytes = max_webhook_bytes

    def limit(self, path: str) -> int:
        return self.max_webhook_bytes if path.startswith("/webhooks/") else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self.refuse(scope, receive, send, limit, int(value) <= DRAIN_FACTOR * limit)
                return
        received = 0
        more = True
        started = False

        async def limited_receive() -> Message:
            nonlocal received, more
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await self.refuse(scope, receive, send, limit, more)

    @staticmethod
    async def refuse(scope: Scope, receive: Receive, send: Send, limit: int, drain: bool) -> None:
        """The 413. A client still sending its body would see the connection reset before it
        reads the answer, so a body up to a few times the limit is read (and dropped) first;
        beyond that the connection is closed after the answer."""
        drained = 0
        while drain and drained <= DRAIN_FACTOR * limit:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = JSONResponse(
            {
                "errors": [
                    {
                        "message": f"The request body is larger than {limit} bytes.",
                        "extensions": {"code": ErrorCode.REQUEST_TOO_LARGE.value},
                    }
                ]
            },
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


async def provider_problems(runtime: Runtime) -> list[dict[str, object]]:
    """Providers refusing mailsync's own configuration (the worker records them): passes
    failing ("configuration") or push refused ("push"), with the setting to check; the users
    of their mailboxes are not to blame."""
    try:
        async with runtime.db.sessionmaker() as session:
            read_only(session)
            issues = await provider_issues(session)
    except Exception as exc:
        log.warning("readiness: provider issues unreadable: %s", exc)
        return []
    return [
        {
            "provider": issue.provider.value,
            "problem": issue.problem.value,
            "fix": issue.fix,
            "detail": issue.detail,
            "failures": issue.failures,
            "firstSeenAt": issue.first_seen_at.isoformat(),
            "lastSeenAt": issue.last_seen_at.isoformat(),
        }
        for issue in issues
    ]


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    graphql_app = MailsyncGraphQL(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging(settings)
        # msgraph-sdk's lazy imports take seconds; pay them here, not in the first callback.
        await asyncio.to_thread(warm_up_graph_sdk)
        runtime = await Runtime.create(settings, jobs=JobQueue, with_hub=True)
        # A GraphQL read allocates tens of thousands of short-lived objects; with the default
        # threshold (700) the collector ran many times per request, walking everything
        # imported at startup too. Startup objects are frozen out of its way and the young
        # generation is collected ~70 times less often (docs/performance.md).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        graphql_app.runtime = runtime
        app.state.runtime = runtime
        missing = graphiql.missing_assets() if settings.graphiql_enabled else []
        if missing:
            log.warning("GraphiQL assets missing (run `npm ci` in backend/graphiql): %s", missing)
        try:
            yield
        finally:
            await runtime.close()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        runtime: Runtime = request.app.state.runtime
        checks: dict[str, str] = {}
        try:
            async with runtime.db.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            log.warning("readiness: database unreachable: %s", exc)
            checks["database"] = "unreachable"
        try:
            await runtime.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            log.warning("readiness: redis unreachable: %s", exc)
            checks["redis"] = "unreachable"
        ready = all(v == "ok" for v in checks.values())
        providers = await provider_problems(runtime) if checks["database"] == "ok" else []
        # Live subscriptions held by this process (its event hub's fan-out).
        subscribers = runtime.hub.subscriber_count if runtime.hub is not None else 0
        # A provider refusing mailsync's configuration is "degraded", not unready: this
        # process serves fine, and taking it out of rotation would not fix the setting.
        status = "unready" if not ready else "degraded" if providers else "ok"
        return JSONResponse(
            {
                "ready": ready,
                "status": status,
                **checks,
                "providers": providers,
                "subscribers": subscribers,
            },
            status_code=200 if ready else 503,
        )

    async def graphiql_asset(request: Request) -> Response:
        path = graphiql.asset_path(request.path_params["name"])
        if path is None or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    # SPAs on other origins (MAILSYNC_CORS_ORIGINS): CORS headers and preflights. Requests carry
    # a bearer token, never cookies, so no credentials mode.
    # CORS wraps the size limit, so a browser can read the 413 too.
    middleware = [
        *(
            [
                Middleware(
                    CORSMiddleware,
                    allow_origins=settings.allowed_origins,
                    allow_methods=["GET", "POST"],
                    allow_headers=["*"],
                    max_age=600,
                )
            ]
            if settings.allowed_origins
            else []
        ),
        Middleware(
            BodySizeLimit,
            max_bytes=settings.max_request_bytes,
            max_webhook_bytes=settings.max_webhook_bytes,
        ),
    ]
    return Starlette(
        middleware=middleware,
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *(
                [Route("/graphiql/static/{name}", graphiql_asset)]
                if settings.graphiql_enabled
                else []
            ),
            Route("/graphql", graphql_app, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql_app),
            Route("/oauth/complete", routes.oauth_complete),
            Route("/oauth/{provider}/callback", routes.oauth_callback),
            Route("/webhooks/google", routes.google_push, methods=["POST"]),
            Route("/webhooks/microsoft", routes.microsoft_notifications, methods=["POST"]),
            Route("/inbound/mime", routes.inbound_mime, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
