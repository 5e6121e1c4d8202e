"""Plain HTTP endpoints beside GraphQL: the OAuth callback, the providers' push webhooks and
the capture address's inbound-mail endpoint."""

from __future__ import annotations

import hmac
import html
import logging
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from backend.capture import inbound
from backend.capture.service import CaptureRefused, capture_key_of
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


class _TooLarge(Exception):
    pass


async def _body_within(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _capture_recipients(request: Request, raw: bytes, capture_domain: str) -> list[str]:
    """The envelope recipients the service names (`?recipient=`, repeatable), else the capture
    addresses among the message's own recipient headers."""
    given = request.query_params.getlist("recipient")
    if given:
        return given
    headers = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    values = [
        str(v)
        for name in ("x-original-to", "delivered-to", "to", "cc", "bcc")
        for v in headers.get_all(name, failobj=[])
    ]
    found = [a for _, a in getaddresses(values) if capture_key_of(a, capture_domain)]
    return list(dict.fromkeys(a.strip().lower() for a in found))


async def inbound_mime(request: Request) -> Response:
    """R16: an inbound-mail service posts the raw MIME of a message sent to a capture address.
    2xx only once it is stored; 503 when storing failed for now (the service retries)."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    secret = settings.inbound_secret
    if secret is None:
        return PlainTextResponse("inbound mail is not configured", status_code=404)
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), secret.encode()):
        return PlainTextResponse("a valid bearer token is required", status_code=401)
    try:
        raw = await _body_within(request, settings.capture_max_bytes)
    except _TooLarge:
        return PlainTextResponse("message too large", status_code=413)
    if not raw.strip():
        return PlainTextResponse("empty message", status_code=400)
    results: list[dict[str, str | None]] = []
    try:
        for address in _capture_recipients(request, raw, settings.capture_domain):
            if await inbound.known_recipient(runtime, address) is None:
                results.append({"recipient": address, "status": "unknown recipient"})
                continue
            try:
                result = await inbound.deliver(runtime, address, raw)
            except CaptureRefused as exc:
                results.append({"recipient": address, "status": "refused", "reason": exc.reason})
                continue
            results.append(
                {
                    "recipient": address,
                    "status": result.status.value,
                    "emailId": to_global_id("Email", result.email_id) if result.email_id else None,
                }
            )
    except Exception:
        log.exception("inbound mail: storing a message failed")
        return PlainTextResponse(
            "temporary failure, retry later", status_code=503, headers={"Retry-After": "60"}
        )
    if not any(r["status"] != "unknown recipient" for r in results):
        return JSONResponse({"results": results, "error": "no capture address"}, status_code=404)
    if all(r["status"] in {"refused", "unknown recipient"} for r in results):
        return JSONResponse({"results": results, "error": "refused"}, status_code=403)
    return JSONResponse({"results": results}, status_code=200)
