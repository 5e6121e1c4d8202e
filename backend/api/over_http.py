"""GraphQL over HTTP as the spec (graphql.github.io/graphql-over-http) asks: the media type the
client accepts, the spec's status codes, and requests that cannot run refused with a 4xx and a
GraphQL error saying why, never a 500."""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from graphql import GraphQLError, OperationDefinitionNode, OperationType
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.types import ExecutionResult, SubscriptionExecutionResult

from backend.graphql.context import Context
from backend.graphql.extensions import UNEXPECTED_MESSAGE
from backend.graphql.limits import DocumentLimits, parse_document
from backend.kit.errors import ErrorCode

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"

# The media type this request's answer uses; set per request (each runs in its own task).
_answer_type: ContextVar[str] = ContextVar("answer_type", default=JSON)


def answer_type(accept: str | None) -> str:
    """`application/graphql-response+json` when the client accepts it at least as much as
    `application/json`; otherwise (no Accept, `*/*`, `application/json`) `application/json`."""
    weights: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        media = media.lower()
        weights[media] = max(weight, weights.get(media, 0.0))
    preferred = weights.get(GRAPHQL_RESPONSE, 0.0)
    plain = max(weights.get(JSON, 0.0), weights.get("application/*", 0.0), weights.get("*/*", 0.0))
    return GRAPHQL_RESPONSE if preferred > 0 and preferred >= plain else JSON


def _operation(
    request: GraphQLRequestData, limits: DocumentLimits
) -> OperationDefinitionNode | None:
    """The operation the request runs; a 400 when the document has several and no name."""
    if not isinstance(request.query, str):
        return None
    try:
        document = parse_document(request.query, limits)
    except GraphQLError:
        return None  # too large or a syntax error: execution reports it, coded
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if request.operation_name is None:
        if len(operations) > 1:
            raise HTTPException(
                400,
                f"The document has {len(operations)} operations: name the one to run in "
                "`operationName`.",
            )
        return operations[0] if operations else None
    return next((o for o in operations if o.name and o.name.value == request.operation_name), None)


def is_request_error(response: GraphQLHTTPResponse) -> bool:
    """Nothing executed: the document did not parse or validate, or variables did not coerce
    (such errors have no path). A field's error, even one that nulls `data`, has a path."""
    errors = response.get("errors") or []
    return (
        response.get("data") is None
        and bool(errors)
        and all(not (isinstance(e, dict) and e.get("path")) for e in errors)
    )


def error_body(message: str) -> GraphQLHTTPResponse:
    return {"errors": [{"message": message, "extensions": {"code": ErrorCode.BAD_REQUEST.value}}]}


# Documents longer than these are not parsed; the schema's own limits may be tighter.
DEFAULT_LIMITS = DocumentLimits(max_length=50_000, max_tokens=5_000, max_depth=12, max_aliases=30)


class GraphQLOverHTTP(GraphQL[Context, None]):
    """Strawberry's ASGI view with the spec's media types and status codes."""

    document_limits: DocumentLimits = DEFAULT_LIMITS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive=receive)
        token = _answer_type.set(answer_type(request.headers.get("accept")))
        try:
            try:
                response = await self.run(request)
            except HTTPException as exc:
                response = self.json_response(error_body(exc.reason), exc.status_code)
            await response(scope, receive, send)
        finally:
            _answer_type.reset(token)

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        content_type = request.content_type or ""
        if request.method == "POST" and not content_type.startswith("multipart/"):
            try:
                (await request.get_body()).decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPException(400, "The request body is not valid UTF-8.") from None
        if request.method == "POST" and "json" in content_type:
            body = self.parse_json(await request.get_body())
            if not isinstance(body, dict | list):
                raise HTTPException(
                    400,
                    "The request body must be a JSON object such as "
                    '{"query": "...", "variables": {...}, "operationName": "..."}.',
                )
        return await super().parse_http_body(request)

    async def execute_operation(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        request_data: GraphQLRequestData | list[GraphQLRequestData],
        context: Context,
        root_value: None,
        sub_response: Response,
    ) -> ExecutionResult | list[ExecutionResult] | SubscriptionExecutionResult:
        for data in request_data if isinstance(request_data, list) else [request_data]:
            operation = _operation(data, self.document_limits)
            streamed = self._get_stream_transport(data.protocol) is not None
            if (
                operation is not None
                and operation.operation == OperationType.SUBSCRIPTION
                and not streamed
            ):
                raise HTTPException(
                    400,
                    "A subscription needs a stream: send `Accept: multipart/mixed;"
                    "subscriptionSpec=1.0` (Apollo's multipart protocol) or use the websocket "
                    "(graphql-transport-ws).",
                )
        return await super().execute_operation(
            request, request_adapter, request_data, context, root_value, sub_response
        )

    def json_response(
        self, data: Any, status_code: int, sub_response: Response | None = None
    ) -> Response:
        media = _answer_type.get()
        if media == GRAPHQL_RESPONSE and isinstance(data, dict) and status_code >= 400:
            data = {k: v for k, v in data.items() if k != "data"}
        response = Response(
            json.dumps(data, separators=(",", ":")),
            status_code=status_code,
            media_type=f"{media}; charset=utf-8",
        )
        if sub_response is not None:
            response.headers.raw.extend(
                (k, v) for k, v in sub_response.headers.raw if k.lower() != b"content-type"
            )
            if sub_response.background:
                response.background = sub_response.background
        return response

    def create_response(
        self,
        response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse],
        sub_response: Response,
    ) -> Response:
        status_code = sub_response.status_code or 200
        if (
            _answer_type.get() == GRAPHQL_RESPONSE
            and isinstance(response_data, dict)
            and is_request_error(response_data)
        ):
            # A masked failure of ours before any field ran is not the client's to fix.
            errors = response_data.get("errors") or []
            unexpected = any(
                isinstance(e, dict) and e.get("message") == UNEXPECTED_MESSAGE for e in errors
            )
            status_code = 500 if unexpected else 400
        return self.json_response(response_data, status_code, sub_response)
