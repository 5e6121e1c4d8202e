"""Plain HTTP endpoints beside GraphQL: the OAuth callback and the providers' push webhooks."""

from __future__ import annotations

import hmac
import html
import logging
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from backend.graphql.relay import to_global_id
from backend.kit.errors import ErrorCode, ServiceError
from backend.mailboxes import connect
from backend.mailboxes.tables import Mailbox
from backend.providers.gmail import push as gmail_push
from backend.providers.microsoft import notifications as graph_notifications
from backend.providers.oauth import provider_of_segment
from backend.runtime import Runtime
from backend.sync import webhooks

log = logging.getLogger(__name__)

MAX_VALIDATION_TOKEN = 1024


async def oauth_callback(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    provider = provider_of_segment(request.path_params["provider"])
    params = request.query_params
    result: Mailbox | ServiceError
    if provider is None:
        result = ServiceError(ErrorCode.UNSUPPORTED_PROVIDER, "Unknown provider.")
    elif "error" in params:
        denied = params["error"] == "access_denied"
        result = ServiceError(
            ErrorCode.ACCESS_DENIED if denied else ErrorCode.PROVIDER_ERROR,
            "Access was not granted: the mailbox was not connected."
            if denied
            else f"The provider answered: {params['error']}",
        )
    elif not params.get("code") or not params.get("state"):
        result = ServiceError(
            ErrorCode.INVALID_REQUEST, "The provider's answer lacks a code or state."
        )
    else:
        try:
            async with runtime.unit_of_work() as work:
                result = await connect.finish(
                    work.session, work.effects, settings, provider, params["code"], params["state"]
                )
        except ServiceError as exc:
            result = exc
    if isinstance(result, ServiceError):
        log.info("OAuth callback failed: %s %s", result.code, result.message)
    global_id = to_global_id("Mailbox", result.id) if isinstance(result, Mailbox) else None
    target = settings.return_url
    sep = "&" if "?" in target else "?"
    return RedirectResponse(
        f"{target}{sep}{urlencode(connect.redirect_params(result, global_id))}", status_code=302
    )


async def oauth_complete(request: Request) -> Response:
    """Where the browser lands when no app URL is configured."""
    params = request.query_params
    if "error" in params:
        title = "The mailbox was not connected"
        text = params.get("message") or params["error"]
    else:
        title = "Mailbox connected"
        text = "Mail will appear on your contacts' timelines shortly. You can close this window."
    return HTMLResponse(
        f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(text)}</p>",
        status_code=200,
    )


async def google_push(request: Request) -> Response:
    """Pub/Sub push. Anything but 2xx makes Pub/Sub retry, so only a wrong secret is refused."""
    runtime: Runtime = request.app.state.runtime
    token = request.query_params.get("token", "")
    if not hmac.compare_digest(token.encode(), runtime.settings.push_token.encode()):
        return Response(status_code=403)
    try:
        envelope = await request.json()
    except ValueError:
        envelope = None
    notice = gmail_push.parse_envelope(envelope)
    if notice is None:
        log.info("ignoring a malformed Gmail push")
        return Response(status_code=204)
    async with runtime.unit_of_work() as work:
        for mailbox_id in await webhooks.gmail_mailboxes_to_sync(work.session, *notice):
            work.effects.request_sync(mailbox_id)
    return Response(status_code=204)


async def microsoft_notifications(request: Request) -> Response:
    """Graph webhooks: the validation handshake, change notifications, lifecycle events.
    Graph wants an answer within 3 seconds, so this only enqueues passes."""
    runtime: Runtime = request.app.state.runtime
    token = request.query_params.get("validationToken")
    if token is not None:
        # Graph's tokens are short opaque strings; echo nothing longer, and never let a
        # browser sniff the echo as HTML.
        if len(token) > MAX_VALIDATION_TOKEN:
            return Response(status_code=400)
        return PlainTextResponse(
            token, status_code=200, headers={"X-Content-Type-Options": "nosniff"}
        )
    try:
        body = await request.json()
    except ValueError:
        body = None
    notices = graph_notifications.read_notices(runtime.settings, body)
    if notices.rejected and not notices.mailbox_ids:
        log.info("refusing %d Graph notifications with a wrong clientState", notices.rejected)
        return Response(status_code=403)
    async with runtime.unit_of_work() as work:
        for mailbox_id in await webhooks.graph_mailboxes_to_sync(work.session, notices):
            work.effects.request_sync(mailbox_id)
    return Response(status_code=202)
