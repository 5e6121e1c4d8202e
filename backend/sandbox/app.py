"""The sandbox as an ASGI app: Google's and Microsoft's endpoints plus a small admin API under /_sandbox/.

The admin API is what a test or the demo uses to play the world outside mailsync: create
accounts, deliver mail from strangers, revoke a grant, inject faults, route Pub/Sub pushes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from backend.sandbox.faults import fault_from_json
from backend.sandbox.google import GoogleSandbox, b64url, error, first
from backend.sandbox.microsoft import MicrosoftSandbox
from backend.sandbox.wire import SubRequest, SubResponse, batch_response, parse_batch

log = logging.getLogger(__name__)


@dataclass
class ResumableUpload:
    path: str
    query: dict[str, list[str]]
    authorization: str
    metadata: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)


def _respond(result: SubResponse) -> Response:
    headers = dict(result.headers)
    media = "application/json; charset=UTF-8" if result.body else None
    return Response(result.body, status_code=result.status, headers=headers, media_type=media)


async def _sub_request(request: Request) -> SubRequest:
    return SubRequest(
        method=request.method,
        path=request.url.path,
        query=parse_qs(request.url.query, keep_blank_values=True),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.body(),
    )


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    merged = {k: v[0] for k, v in parse_qs(request.url.query).items()}
    merged.update({k: v[0] for k, v in parse_qs(body).items()})
    return merged


def _basic_client(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(header[6:]).decode().partition(":")[0]
    except ValueError:
        return None


def create_sandbox_app(
    google: GoogleSandbox | None = None, microsoft: MicrosoftSandbox | None = None
) -> Starlette:
    google = google or GoogleSandbox()
    # One fault table for both: their paths differ (/gmail/..., /v1.0/...).
    microsoft = microsoft or MicrosoftSandbox(faults=google.faults)
    # Mail between the two sandboxes' mailboxes is delivered across.
    google.external_delivery = lambda address, raw: _deliver_if_known(microsoft, address, raw)
    microsoft.external_delivery = lambda address, raw: _deliver_if_known(google, address, raw)
    uploads: dict[str, ResumableUpload] = {}
    client: dict[str, httpx.AsyncClient] = {}

    async def push(endpoint: str, envelope: dict[str, Any]) -> None:
        # Pub/Sub retries a push that is not acknowledged with a 2xx, backing off.
        for attempt in range(4):
            try:
                response = await client["http"].post(endpoint, json=envelope, timeout=10)
                if response.status_code < 300:
                    return
                log.info("push to %s answered %s", endpoint, response.status_code)
                if response.status_code in (400, 403, 404):
                    return
            except httpx.HTTPError as exc:
                log.info("push to %s failed: %r", endpoint, exc)
            await asyncio.sleep(0.5 * 2**attempt)

    async def post_to_app(url: str, body: dict[str, Any] | None) -> tuple[int, str]:
        """Graph's calls to the app: a validation POST (no body) or a notification."""
        try:
            if body is None:
                response = await client["http"].post(url, timeout=10)
            else:
                response = await client["http"].post(url, json=body, timeout=10)
        except httpx.HTTPError as exc:
            log.info("Graph notification to %s failed: %r", url, exc)
            return 0, ""
        return response.status_code, response.text

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client["http"] = httpx.AsyncClient(trust_env=False)
        google.push_sink = push
        microsoft.poster = post_to_app
        try:
            yield
        finally:
            google.push_sink = None
            microsoft.poster = None
            await client["http"].aclose()

    async def ms_authorize(request: Request) -> Response:
        query = dict(request.query_params.items())
        return _authorize_answer(*microsoft.authorize(request.path_params["tenant"], query))

    async def ms_token(request: Request) -> Response:
        return _respond(microsoft.token(await _form(request)))

    async def graph(request: Request) -> Response:
        base = f"{request.url.scheme}://{request.url.netloc}/v1.0"
        result = await microsoft.handle(await _sub_request(request), base)
        if result.headers.get("Content-Type") == "text/plain":
            return Response(result.body, status_code=result.status, headers=result.headers)
        return _respond(result)

    async def ms_admin_account(request: Request) -> Response:
        data = await request.json()
        account = microsoft.ensure_account(
            str(data["email"]), data.get("proxyAddresses"), data.get("name", "")
        )
        return JSONResponse({"email": account.email, "proxyAddresses": account.proxy_addresses})

    async def ms_admin_show(request: Request) -> Response:
        account = microsoft.account(request.path_params["email"])
        if account is None:
            return JSONResponse({"error": "no such account"}, status_code=404)
        return JSONResponse(
            {
                "email": account.email,
                "proxyAddresses": account.proxy_addresses,
                "messages": [
                    {
                        "id": m.id,
                        "folder": account.folders[m.folder_id].well_known,
                        "conversationId": m.conversation_id,
                        "internetMessageId": m.internet_message_id,
                        "categories": m.categories,
                    }
                    for m in account.messages.values()
                ],
                "subscriptions": [
                    s.as_json()
                    for s in microsoft.subscriptions.values()
                    if s.account == account.email
                ],
            }
        )

    async def ms_admin_deliver(request: Request) -> Response:
        data = await request.json()
        raw = (
            base64.b64decode(str(data["rawBase64"]))
            if "rawBase64" in data
            else str(data["raw"]).encode()
        )
        message = microsoft.deliver(request.path_params["email"], raw, data.get("folder", "inbox"))
        return JSONResponse({"id": message.id, "conversationId": message.conversation_id})

    async def ms_admin_action(request: Request) -> Response:
        address, action = request.path_params["email"], request.path_params["action"]
        if action == "token":
            data = await request.json() if await request.body() else {}
            return JSONResponse({"access_token": microsoft.mint_token(address, data.get("scopes"))})
        account = microsoft.account(address)
        if account is None:
            return JSONResponse({"error": "no such account"}, status_code=404)
        if action == "revoke":
            microsoft.revoke_account(address)
        elif action == "expire-tokens":
            microsoft.expire_access_tokens(address)
        elif action == "expire-delta":
            microsoft.expire_delta(address)
        elif action == "disable":
            account.enabled = False
        else:
            return JSONResponse({"error": f"unknown action {action}"}, status_code=404)
        return JSONResponse({"ok": True})

    async def ms_admin_lifecycle(request: Request) -> Response:
        event = str((await request.json()).get("event", ""))
        if event not in ("reauthorizationRequired", "subscriptionRemoved", "missed"):
            return JSONResponse({"error": f"unknown lifecycle event {event}"}, status_code=400)
        try:
            microsoft.lifecycle(request.path_params["id"], event)
        except KeyError:
            return JSONResponse({"error": "no such subscription"}, status_code=404)
        return JSONResponse({"ok": True})

    async def authorize(request: Request) -> Response:
        return _authorize_answer(*google.authorize(dict(request.query_params.items())))

    async def token(request: Request) -> Response:
        return _respond(google.token(await _form(request), _basic_client(request)))

    async def revoke(request: Request) -> Response:
        return _respond(google.revoke((await _form(request)).get("token", "")))

    async def gmail(request: Request) -> Response:
        return _respond(await google.handle(await _sub_request(request)))

    async def upload(request: Request) -> Response:
        sub = await _sub_request(request)
        kind = first(sub.query, "uploadType")
        if request.method == "POST" and kind == "resumable":
            try:
                metadata = json.loads(sub.body or b"{}")
            except ValueError:
                return _respond(error(400, "Invalid JSON payload received.", "invalidArgument"))
            upload_id = secrets.token_urlsafe(16)
            uploads[upload_id] = ResumableUpload(
                sub.path, sub.query, sub.headers.get("authorization", ""), metadata
            )
            location = f"{request.url.replace(query='')}?uploadType=resumable&upload_id={upload_id}"
            return Response(status_code=200, headers={"Location": location})
        if request.method == "PUT":
            session = uploads.get(first(sub.query, "upload_id") or "")
            if session is None:
                return _respond(error(404, "Upload session not found", "notFound"))
            session.data += sub.body
            total = _content_range_total(sub.headers.get("content-range", ""))
            if total is not None and len(session.data) < total:
                return Response(
                    status_code=308, headers={"Range": f"bytes=0-{len(session.data) - 1}"}
                )
            uploads.pop(first(sub.query, "upload_id") or "", None)
            body = {**session.metadata, "raw": b64url(bytes(session.data))}
            query = {k: v for k, v in session.query.items() if k not in ("uploadType", "upload_id")}
            final = SubRequest(
                "POST",
                session.path.removeprefix("/upload"),
                query,
                {"authorization": session.authorization, "content-type": "application/json"},
                json.dumps(body).encode(),
            )
            return _respond(await google.handle(final))
        return _respond(await google.handle(sub))

    async def batch(request: Request) -> Response:
        try:
            parts = parse_batch(await request.body(), request.headers.get("content-type", ""))
        except ValueError as exc:
            return _respond(error(400, str(exc), "invalidArgument"))
        if len(parts) > 100:
            return _respond(error(400, "Too many requests in batch (max 100)", "invalidArgument"))
        answers = [await google.handle(part) for part in parts]
        body, content_type = batch_response(list(zip(parts, answers, strict=True)))
        return Response(body, headers={"Content-Type": content_type})

    # ---------------------------------------------------------------- admin
    async def admin_account(request: Request) -> Response:
        data = await request.json()
        account = google.ensure_account(
            str(data["email"]), data.get("aliases"), data.get("name", "")
        )
        return JSONResponse({"email": account.email, "aliases": account.aliases})

    def _account_or_404(request: Request) -> Any:
        return google.account(request.path_params["email"])

    async def admin_show(request: Request) -> Response:
        account = _account_or_404(request)
        if account is None:
            return JSONResponse({"error": "no such account"}, status_code=404)
        return JSONResponse(
            {
                "email": account.email,
                "aliases": account.aliases,
                "historyId": account.history_id,
                "messages": [m.summary() for m in account.messages.values()],
                "labels": list(account.labels.values()),
                "watch": None
                if account.watch is None
                else {"topic": account.watch.topic, "labelIds": account.watch.label_ids},
            }
        )

    async def admin_deliver(request: Request) -> Response:
        data = await request.json()
        raw = data.get("raw")
        message = (
            google.deliver(request.path_params["email"], str(raw).encode(), data.get("labelIds"))
            if raw is not None
            else google.deliver(
                request.path_params["email"],
                base64.b64decode(str(data["rawBase64"])),
                data.get("labelIds"),
            )
        )
        return JSONResponse(message.summary())

    async def admin_action(request: Request) -> Response:
        address, action = request.path_params["email"], request.path_params["action"]
        if google.account(address) is None and action != "token":
            return JSONResponse({"error": "no such account"}, status_code=404)
        if action == "token":
            data = await request.json() if await request.body() else {}
            return JSONResponse({"access_token": google.mint_token(address, data.get("scopes"))})
        if action == "revoke":
            google.revoke_account(address)
        elif action == "expire-tokens":
            google.expire_access_tokens(address)
        elif action == "expire-history":
            google.expire_history(address)
        elif action == "send-limit":
            google.ensure_account(address).daily_send_limit = int((await request.json())["limit"])
        elif action == "quota":
            data = await request.json()
            units = data.get("units")
            google.set_quota(
                address,
                None if units is None else int(units),
                float(data.get("windowSeconds", 60)),
            )
        else:
            return JSONResponse({"error": f"unknown action {action}"}, status_code=404)
        return JSONResponse({"ok": True})

    async def admin_push_subscription(request: Request) -> Response:
        data = await request.json()
        google.push_endpoints[str(data.get("topic") or "*")] = str(data["pushEndpoint"])
        return JSONResponse({"ok": True})

    async def admin_faults(request: Request) -> Response:
        if request.method == "DELETE":
            google.faults.clear()
            return JSONResponse({"ok": True})
        if request.method == "GET":
            return JSONResponse([f.as_dict() for f in google.faults.faults])
        fault = google.faults.add(fault_from_json(await request.json()))
        return JSONResponse(fault.as_dict())

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(
        routes=[
            Route("/o/oauth2/v2/auth", authorize),
            Route("/token", token, methods=["POST"]),
            Route("/revoke", revoke, methods=["POST"]),
            Route("/o/oauth2/revoke", revoke, methods=["POST", "GET"]),
            Route("/batch", batch, methods=["POST"]),
            Route("/batch/gmail/v1", batch, methods=["POST"]),
            Route("/gmail/v1/{rest:path}", gmail, methods=methods),
            Route("/upload/gmail/v1/{rest:path}", upload, methods=["POST", "PUT"]),
            Route("/{tenant}/oauth2/v2.0/authorize", ms_authorize),
            Route("/{tenant}/oauth2/v2.0/token", ms_token, methods=["POST"]),
            Route("/v1.0/{rest:path}", graph, methods=methods),
            Route("/_sandbox/health", health),
            Route("/_sandbox/microsoft/accounts", ms_admin_account, methods=["POST"]),
            Route("/_sandbox/microsoft/accounts/{email}", ms_admin_show),
            Route(
                "/_sandbox/microsoft/accounts/{email}/messages", ms_admin_deliver, methods=["POST"]
            ),
            Route(
                "/_sandbox/microsoft/accounts/{email}/{action}", ms_admin_action, methods=["POST"]
            ),
            Route(
                "/_sandbox/microsoft/subscriptions/{id}/lifecycle",
                ms_admin_lifecycle,
                methods=["POST"],
            ),
            Route("/_sandbox/google/accounts", admin_account, methods=["POST"]),
            Route("/_sandbox/google/accounts/{email}", admin_show),
            Route("/_sandbox/google/accounts/{email}/messages", admin_deliver, methods=["POST"]),
            Route("/_sandbox/google/accounts/{email}/{action}", admin_action, methods=["POST"]),
            Route("/_sandbox/pubsub/subscriptions", admin_push_subscription, methods=["POST"]),
            Route("/_sandbox/faults", admin_faults, methods=["GET", "POST", "DELETE"]),
        ],
        lifespan=lifespan,
    )
    app.state.google = google
    app.state.microsoft = microsoft
    return app


def _authorize_answer(status: int, headers: dict[str, str], body: str) -> Response:
    """An authorize endpoint's answer: the redirect back, the consent page, or an error."""
    if status == 302:
        return Response(status_code=302, headers=headers)
    if status == 200:
        return HTMLResponse(body)
    return PlainTextResponse(body, status_code=status)


def _deliver_if_known(sandbox: GoogleSandbox | MicrosoftSandbox, address: str, raw: bytes) -> bool:
    if sandbox.account(address) is None:
        return False
    sandbox.deliver(address, raw)
    return True


def _content_range_total(header: str) -> int | None:
    # "bytes 0-99/1000" or "bytes */1000"
    _, _, total = header.partition("/")
    return int(total) if total.strip().isdigit() else None
