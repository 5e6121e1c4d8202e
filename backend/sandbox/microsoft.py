"""The Microsoft identity platform (v2.0) and Microsoft Graph v1.0 mail, in memory.

Faithful to the documented behaviour the product depends on: per-folder delta queries with
absolute nextLink/deltaLink, `Prefer: odata.maxpagesize` and ImmutableId, `@removed`
entries, an expired sync state answering 410 with `syncStateNotFound`; `sendMail` (202)
with PascalCase action bodies; `createReply` + `send` keeping the conversation; categories;
subscriptions with the validation handshake, change notifications and lifecycle events;
refresh-token rotation and AADSTS errors. Faults come from the `FaultTable` it shares with
the Google sandbox. docs/providers.md describes it.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import html
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from email.utils import format_datetime, getaddresses, make_msgid, parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode

from backend.sandbox.faults import Fault, FaultTable
from backend.sandbox.wire import SubRequest, SubResponse, prepend_headers, strip_header

_AADSTS = re.compile(r"^AADSTS(\d+):")
GRAPH_PREFIX = "/v1.0/"
WELL_KNOWN = {"inbox": "Inbox", "sentitems": "Sent Items", "drafts": "Drafts"}
DEFAULT_PAGE = 10
MAX_PAGE = 1000
# Outlook message subscriptions: under 7 days (configurable; older docs say 4,230 minutes).
SUBSCRIPTION_MAX_MINUTES = 10_080
_FOLDER_RESOURCE = re.compile(
    r"^/?(?:me|users/[^/]+)/mailfolders(?:\('([^']+)'\)|/([^/]+))/messages$", re.IGNORECASE
)
_ALL_MESSAGES = re.compile(r"^/?(?:me|users/[^/]+)/messages$", re.IGNORECASE)
_MSGID = re.compile(r"<[^<>\s]+>")
# Graph answers 413 to a request over 4 MB (user-post-messages; sendMail likewise).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
_FILTER_MESSAGE_ID = re.compile(r"internetMessageId\s+eq\s+'((?:[^']|'')*)'", re.IGNORECASE)
_FILTER_SINCE = re.compile(r"receivedDateTime\s+(ge|gt)\s+(\S+)", re.IGNORECASE)
# Outlook service limits of Graph's throttling guide (learn.microsoft.com/graph/
# throttling-limits#outlook-service-limits), per app ID and mailbox: 4 concurrent requests
# (MailboxConcurrency) and 10,000 requests per 10 minutes; past either, 429 with Retry-After.
MAILBOX_CONCURRENCY = 4
MAILBOX_REQUESTS = 10_000
MAILBOX_WINDOW_SECONDS = 600.0
# The AADSTS code a token-endpoint fault carries when its message names none.
FAULT_AADSTS = {
    "invalid_grant": 50173,
    "interaction_required": 50076,
    "invalid_client": 7000215,
    "unauthorized_client": 700016,
    "invalid_scope": 70011,
}


def graph_error(status: int, code: str, message: str, **headers: str) -> SubResponse:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": str(uuid.uuid4()),
                "client-request-id": str(uuid.uuid4()),
            },
        }
    }
    return SubResponse(status, json.dumps(body).encode(), dict(headers))


def ok(data: Any, status: int = 200) -> SubResponse:
    return SubResponse(status, json.dumps(data).encode())


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _encode_token(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode_token(value: str) -> dict[str, Any] | None:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _ci(data: dict[str, Any], key: str) -> Any:
    """Action parameters are matched case-insensitively (the SDK sends PascalCase)."""
    return next((v for k, v in data.items() if k.lower() == key.lower()), None)


class BadRequest(Exception):
    pass


class MimeInvalid(BadRequest):
    """A text/plain body that is not base64 MIME."""


def _is_mime(req: SubRequest) -> bool:
    return req.headers.get("content-type", "").lower().startswith("text/plain")


def _immutable(req: SubRequest) -> bool:
    return _prefer(req.headers.get("prefer", "")).get("idtype", "").lower() == "immutableid"


@dataclass
class Folder:
    id: str
    well_known: str
    display_name: str


@dataclass
class MsMessage:
    id: str
    folder_id: str
    conversation_id: str
    raw: bytes
    received: datetime
    internet_message_id: str
    change_key: str = field(default_factory=lambda: secrets.token_urlsafe(8))
    categories: list[str] = field(default_factory=list)
    is_draft: bool = False
    is_read: bool = False
    # A draft whose id was handed out as an ImmutableId keeps it when sent (Sent Items).
    keep_id: bool = False
    seq: int = 0  # the change that last touched it (delta)

    def parsed(self) -> Message:
        return email.message_from_bytes(self.raw, policy=email.policy.compat32)

    def as_json(self, account: MsAccount) -> dict[str, Any]:
        msg = email.message_from_bytes(self.raw, policy=email.policy.default)

        def recipients(name: str) -> list[dict[str, Any]]:
            return [
                {"emailAddress": {"name": display or address, "address": address}}
                for display, address in getaddresses([str(v) for v in msg.get_all(name, [])])
                if address
            ]

        sender = recipients("from")
        body = msg.get_body(preferencelist=("html", "plain"))
        content = body.get_content() if body is not None else ""
        content_type = (
            "html" if body is not None and body.get_content_subtype() == "html" else "text"
        )
        try:
            sent = parsedate_to_datetime(str(msg.get("date", ""))) or self.received
        except (TypeError, ValueError):
            sent = self.received
        return {
            "@odata.type": "#microsoft.graph.message",
            "@odata.etag": f'W/"{self.change_key}"',
            "id": self.id,
            "createdDateTime": iso(self.received),
            "lastModifiedDateTime": iso(self.received),
            "changeKey": self.change_key,
            "categories": list(self.categories),
            "receivedDateTime": iso(self.received),
            "sentDateTime": iso(sent),
            "hasAttachments": any(p.get_content_disposition() == "attachment" for p in msg.walk()),
            "internetMessageId": self.internet_message_id,
            "subject": str(msg.get("subject", "")),
            "bodyPreview": " ".join(str(content).split())[:255],
            "importance": "normal",
            "parentFolderId": self.folder_id,
            "conversationId": self.conversation_id,
            "isRead": self.is_read,
            "isDraft": self.is_draft,
            "webLink": f"https://outlook.office365.com/owa/?ItemID={quote(self.id)}",
            "body": {"contentType": content_type, "content": str(content)},
            "sender": sender[0] if sender else None,
            "from": sender[0] if sender else None,
            "toRecipients": recipients("to"),
            "ccRecipients": recipients("cc"),
            "bccRecipients": recipients("bcc")
            if self.folder_id != account.folder("inbox").id
            else [],
            "replyTo": recipients("reply-to"),
        }


@dataclass
class Change:
    seq: int
    folder_id: str
    message_id: str
    kind: str  # created, updated, deleted


@dataclass
class Subscription:
    id: str
    account: str
    resource: str
    change_types: list[str]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None
    expires: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": "00000000-0000-0000-0000-00000000sand",
            "changeType": ",".join(self.change_types),
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": iso(self.expires),
            "creatorId": self.account,
            "latestSupportedTlsVersion": "v1_2",
        }

    def folder_key(self) -> str | None:
        """The well-known name or id of the watched folder; None for all messages."""
        match = _FOLDER_RESOURCE.match(self.resource)
        if match:
            return (match.group(1) or match.group(2)).lower()
        return None


@dataclass
class MsAccount:
    email: str
    user_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    display_name: str = ""
    proxy_addresses: list[str] = field(default_factory=list)
    folders: dict[str, Folder] = field(default_factory=dict)
    messages: dict[str, MsMessage] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    seq: int = 0
    # Sync states older than this answer 410 syncStateNotFound (the tokens were evicted).
    delta_floor: int = 0
    enabled: bool = True  # False: MailboxNotEnabledForRESTAPI
    # How long each Graph request takes here (requests overlap only if they take time), and
    # an own request limit (requests per window of seconds) for tests; None: the documented.
    latency: float = 0.0
    request_limit: tuple[int, float] | None = None
    refreshes: int = 0  # refresh-token grants answered, for tests
    throttled: int = 0  # requests refused by the Outlook service limits
    most_in_flight: int = 0

    def __post_init__(self) -> None:
        for name, display in WELL_KNOWN.items():
            folder_id = "AAMkAD" + base64.urlsafe_b64encode(secrets.token_bytes(24)).decode()
            self.folders[folder_id] = Folder(folder_id, name, display)

    def folder(self, key: str) -> Folder:
        key_lower = key.lower()
        for folder in self.folders.values():
            if folder.id == key or folder.well_known == key_lower:
                return folder
        raise KeyError(key)

    def addresses(self) -> set[str]:
        return {self.email, *self.proxy_addresses}


@dataclass
class MsGrant:
    email: str
    client_id: str
    scopes: list[str]
    refresh_token: str
    revoked: bool = False


@dataclass
class MsCode:
    grant: MsGrant
    redirect_uri: str
    expires_at: float


# What the sandbox sends to the app: (url, JSON body or None for the validation POST,
# query) → (status, text). Provided by the ASGI app, which owns the HTTP client.
Poster = Callable[[str, dict[str, Any] | None], Awaitable[tuple[int, str]]]
ExternalDelivery = Callable[[str, bytes], bool]


class MicrosoftSandbox:
    def __init__(
        self,
        *,
        access_token_ttl: int = 3600,
        subscription_max_minutes: int = SUBSCRIPTION_MAX_MINUTES,
        tenant_id: str = "9188040d-6c67-4c5b-b112-36a304b66dad",
        faults: FaultTable | None = None,
    ) -> None:
        self.access_token_ttl = access_token_ttl
        self.subscription_max_minutes = subscription_max_minutes
        self.tenant_id = tenant_id
        self.accounts: dict[str, MsAccount] = {}
        self.grants: dict[str, MsGrant] = {}
        self.access_tokens: dict[str, tuple[MsGrant, float]] = {}
        self.codes: dict[str, MsCode] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.faults = faults or FaultTable()
        self.poster: Poster | None = None
        # Mail to an address no Microsoft account holds (the Gmail sandbox, when both run).
        self.external_delivery: ExternalDelivery | None = None
        self.notifications_sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.RLock()
        # Per (app, mailbox): requests in flight, and the times of the recent ones.
        self._in_flight: dict[tuple[str, str], int] = {}
        self._recent: dict[tuple[str, str], deque[float]] = {}

    # ------------------------------------------------------------------ accounts (admin)
    def account(self, address: str) -> MsAccount | None:
        address = address.strip().lower()
        found = self.accounts.get(address)
        if found is not None:
            return found
        return next((a for a in self.accounts.values() if address in a.proxy_addresses), None)

    def ensure_account(
        self, address: str, proxy_addresses: list[str] | None = None, name: str = ""
    ) -> MsAccount:
        with self._lock:
            address = address.strip().lower()
            found = self.accounts.get(address)
            if found is None:
                found = self.accounts[address] = MsAccount(address, display_name=name)
            if proxy_addresses is not None:
                found.proxy_addresses = [a.strip().lower() for a in proxy_addresses]
            if name:
                found.display_name = name
            return found

    def mint_token(self, address: str, scopes: list[str] | None = None) -> str:
        account = self.ensure_account(address)
        grant = self._grant(
            account.email, "sandbox-admin", scopes or ["Mail.ReadWrite", "Mail.Send"]
        )
        return self._access_token(grant)

    def revoke_account(self, address: str) -> None:
        with self._lock:
            for grant in self.grants.values():
                if grant.email == address.lower():
                    grant.revoked = True

    def expire_access_tokens(self, address: str) -> None:
        with self._lock:
            for token, (grant, _) in list(self.access_tokens.items()):
                if grant.email == address.lower():
                    self.access_tokens[token] = (grant, 0)

    def expire_delta(self, address: str) -> None:
        """Evict every sync state handed out so far: their delta links answer 410."""
        with self._lock:
            account = self._require(address)
            account.seq += 1
            account.delta_floor = account.seq

    def deliver(self, address: str, raw: bytes, folder: str = "inbox") -> MsMessage:
        """Mail arriving from outside into a folder of the account."""
        with self._lock:
            account = self._require(address)
            message = self._store(account, raw, account.folder(folder))
        self._notify(account, message, "created")
        return message

    def accepts(self, address: str) -> bool:
        return self.account(address) is not None

    def _require(self, address: str) -> MsAccount:
        account = self.account(address)
        if account is None:
            raise KeyError(address)
        return account

    # ------------------------------------------------------------------ identity platform
    def _grant(self, address: str, client_id: str, scopes: list[str]) -> MsGrant:
        grant = MsGrant(address, client_id, scopes, "0.ARsandbox-" + secrets.token_urlsafe(32))
        self.grants[grant.refresh_token] = grant
        return grant

    def _access_token(self, grant: MsGrant) -> str:
        token = "EwBsandbox-" + secrets.token_urlsafe(32)
        self.access_tokens[token] = (grant, time.time() + self.access_token_ttl)
        return token

    def authorize(self, tenant: str, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        """GET /{tenant}/oauth2/v2.0/authorize: approve the account in `login_hint`."""
        client_id, redirect_uri = query.get("client_id"), query.get("redirect_uri")
        if not client_id or not redirect_uri:
            return (
                400,
                {},
                "AADSTS900144: The request body must contain client_id and redirect_uri.",
            )

        def back(**params: str) -> tuple[int, dict[str, str], str]:
            if "state" in query:
                params["state"] = query["state"]
            sep = "&" if "?" in redirect_uri else "?"
            return 302, {"location": f"{redirect_uri}{sep}{urlencode(params)}"}, ""

        if query.get("response_type") != "code":
            return back(
                error="unsupported_response_type",
                error_description="AADSTS700054: response_type 'code' is required.",
            )
        scopes = query.get("scope", "").split()
        if not scopes:
            return back(error="invalid_scope", error_description="AADSTS70011: no scope given.")
        hint = (query.get("login_hint") or "").strip().lower()
        if not hint or "@" not in hint:
            return 200, {"content-type": "text/html"}, _consent_page(tenant, query)
        fault = self.faults.take(hint, "GET", "/oauth2/v2.0/authorize")
        if query.get("decision") == "deny" or (fault is not None and fault.status):
            return back(
                error=(fault.reason if fault and fault.reason else "access_denied"),
                error_description="AADSTS65004: User declined to consent to access the app.",
            )
        with self._lock:
            account = self.ensure_account(hint)
            grant = self._grant(account.email, client_id, scopes)
            code = "0.ARcode-" + secrets.token_urlsafe(32)
            self.codes[code] = MsCode(grant, redirect_uri, time.time() + 600)
        return back(code=code, session_state=str(uuid.uuid4()))

    def token(self, form: dict[str, str]) -> SubResponse:
        """POST /{tenant}/oauth2/v2.0/token: code and refresh grants, with rotation."""

        def aad_error(name: str, code: int, description: str, status: int = 400) -> SubResponse:
            body = {
                "error": name,
                # Code 0: an OAuth error the platform names without an AADSTS number.
                "error_description": f"AADSTS{code}: {description}" if code else description,
                "error_codes": [code] if code else [],
                "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                "trace_id": str(uuid.uuid4()),
                "correlation_id": str(uuid.uuid4()),
            }
            return SubResponse(status, json.dumps(body).encode())

        client_id = form.get("client_id", "")
        grant_type = form.get("grant_type")
        with self._lock:
            if grant_type == "authorization_code":
                auth = self.codes.pop(form.get("code", ""), None)
                if auth is None or auth.expires_at < time.time():
                    return aad_error(
                        "invalid_grant", 70008, "The provided authorization code has expired."
                    )
                if auth.grant.client_id != client_id:
                    return aad_error(
                        "invalid_client", 700016, "Application not found in the directory.", 401
                    )
                if auth.redirect_uri != form.get("redirect_uri"):
                    return aad_error(
                        "invalid_grant", 50148, "The redirect_uri does not match the request."
                    )
                grant = auth.grant
            elif grant_type == "refresh_token":
                found = self.grants.get(form.get("refresh_token", ""))
                if found is None:
                    return aad_error(
                        "invalid_grant",
                        70008,
                        "The provided authorization code or refresh token has expired due to "
                        "inactivity.",
                    )
                if found.revoked:
                    return aad_error(
                        "invalid_grant",
                        50173,
                        "The provided grant has expired due to it being revoked, a fresh auth "
                        "token is needed.",
                    )
                if found.client_id not in (client_id, "sandbox-admin"):
                    return aad_error("unauthorized_client", 700016, "Application not found.")
                # Rotation as documented ("Refresh tokens in the Microsoft identity platform"):
                # the answer carries a new refresh token, but the one used is not revoked;
                # both work until they lapse or the grant is revoked.
                found.refresh_token = "0.ARsandbox-" + secrets.token_urlsafe(32)
                self.grants[found.refresh_token] = found
                account = self.accounts.get(found.email)
                if account is not None:
                    account.refreshes += 1
                grant = found
            else:
                return aad_error(
                    "unsupported_grant_type",
                    70003,
                    f"The grant type {grant_type} is not supported.",
                )
            fault = self.faults.take(grant.email, "POST", "/oauth2/v2.0/token")
            if fault is not None and fault.status:
                # The identity platform's answer: `error` (the OAuth name) and the AADSTS
                # code, taken from a message written as "AADSTS<code>: ...".
                name = fault.reason or "invalid_grant"
                named = _AADSTS.match(fault.message or "")
                code = int(named.group(1)) if named else FAULT_AADSTS.get(name, 0)
                text = (fault.message or "").split(":", 1)[1].strip() if named else None
                return aad_error(name, code, text or fault.message or name, fault.status)
            granted = [
                s for s in grant.scopes if s.lower() not in ("offline_access", "openid", "profile")
            ]
            body: dict[str, Any] = {
                "token_type": "Bearer",
                "scope": " ".join(granted),
                "expires_in": self.access_token_ttl,
                "ext_expires_in": self.access_token_ttl,
                "access_token": self._access_token(grant),
            }
            if (
                any(s.lower() == "offline_access" for s in grant.scopes)
                or grant_type == "refresh_token"
            ):
                body["refresh_token"] = grant.refresh_token
            return ok(body)

    # ------------------------------------------------------------------ Graph
    async def handle(self, request: SubRequest, base_url: str) -> SubResponse:
        """One Graph call. `base_url` is the absolute ".../v1.0" for links in answers."""
        path = re.sub(r"/{2,}", "/", request.path)  # the SDK sends /v1.0//me/...
        bearer = request.headers.get("authorization", "")
        found = (
            self.access_tokens.get(bearer[7:].strip())
            if bearer.lower().startswith("bearer ")
            else None
        )
        fault = self.faults.take(found[0].email if found else None, request.method, path)
        if fault is not None:
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            if fault.after:
                answer = await self._answer(request, base_url, path, found)
                await asyncio.sleep(fault.after_delay_seconds or 0)
                return self._fault_response(fault) if fault.status else answer
            if fault.status:
                return self._fault_response(fault)
        account = self.accounts.get(found[0].email) if found else None
        if found is None or account is None:
            return await self._answer(request, base_url, path, found)
        key = (found[0].client_id, account.email)
        refused = self._over_limits(account, key)
        if refused is not None:
            return refused
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        account.most_in_flight = max(account.most_in_flight, self._in_flight[key])
        try:
            if account.latency:
                await asyncio.sleep(account.latency)
            return await self._answer(request, base_url, path, found)
        finally:
            self._in_flight[key] -= 1

    def _over_limits(self, account: MsAccount, key: tuple[str, str]) -> SubResponse | None:
        """The Outlook service limits, per app and mailbox: a 429 with Retry-After past
        MailboxConcurrency or the requests of the window; None when the request may run."""
        limit, window = account.request_limit or (MAILBOX_REQUESTS, MAILBOX_WINDOW_SECONDS)
        moment = time.monotonic()
        recent = self._recent.setdefault(key, deque())
        while recent and recent[0] <= moment - window:
            recent.popleft()
        if self._in_flight.get(key, 0) >= MAILBOX_CONCURRENCY:
            account.throttled += 1
            return graph_error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                **{"Retry-After": "1"},
            )
        if len(recent) >= limit:
            account.throttled += 1
            wait = max(1, int(recent[0] + window - moment) + 1)
            return graph_error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxRequestLimit.",
                **{"Retry-After": str(wait)},
            )
        recent.append(moment)
        return None

    async def _answer(
        self,
        request: SubRequest,
        base_url: str,
        path: str,
        found: tuple[MsGrant, float] | None,
    ) -> SubResponse:
        if found is None or found[0].revoked or found[1] < time.time():
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid."
                if found
                else "IDX14100: JWT is not well formed.",
                **{
                    "WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize"'
                },
            )
        grant = found[0]
        rest = path.removeprefix(GRAPH_PREFIX.rstrip("/")).lstrip("/")
        with self._lock:
            account = self.accounts.get(grant.email)
            if account is None:
                return graph_error(404, "ResourceNotFound", "User not found")
            if not account.enabled and rest.lower().startswith("me"):
                return graph_error(
                    404,
                    "MailboxNotEnabledForRESTAPI",
                    "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                )
        try:
            if rest.lower().startswith("subscriptions"):
                return await self._subscriptions(account, request, rest)
            with self._lock:
                answer, notify = self._route(account, grant, request, rest, base_url)
            for message, kind in notify:
                self._notify(self.accounts[message[0]], message[1], kind)
            return answer
        except MimeInvalid:
            return graph_error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        except BadRequest as exc:
            return graph_error(400, "ErrorInvalidRequest", str(exc))

    def _fault_response(self, fault: Fault) -> SubResponse:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        code = fault.reason or {
            401: "InvalidAuthenticationToken",
            403: "ErrorAccessDenied",
            404: "MailboxNotEnabledForRESTAPI",
            429: "ApplicationThrottled",
            503: "ServiceUnavailable",
        }.get(fault.status, "InternalServerError")
        message = fault.message or {
            "ApplicationThrottled": "Application is over its MailboxConcurrency limit.",
            "MailboxNotEnabledForRESTAPI": "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            "ErrorAccessDenied": "Access is denied. Check credentials and try again.",
        }.get(code, "The service is unavailable.")
        return graph_error(fault.status, code, message, **headers)

    def _route(
        self,
        account: MsAccount,
        grant: MsGrant,
        req: SubRequest,
        rest: str,
        base_url: str,
    ) -> tuple[SubResponse, list[tuple[tuple[str, MsMessage], str]]]:
        method = req.method.upper()
        parts = [unquote(p) for p in rest.split("/")]
        if len(parts) > 1 and parts[1].lower().startswith("mailfolders("):
            # mailFolders('id') addresses the same folder as mailFolders/id.
            parts[1:2] = [parts[1][: len("mailFolders")], parts[1][len("mailFolders") :]]
        lower = [p.lower() for p in parts]
        scopes = {s.lower() for s in grant.scopes}
        notify: list[tuple[tuple[str, MsMessage], str]] = []

        def need(scope: str) -> SubResponse | None:
            wanted = {scope.lower(), "mail.readwrite"} if scope != "mail.send" else {"mail.send"}
            if scopes & wanted:
                return None
            return graph_error(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )

        if lower[0] != "me":
            return graph_error(400, "BadRequest", f"Unsupported segment: {parts[0]}"), notify
        if len(parts) == 1 and method == "GET":
            return ok(
                {
                    "@odata.context": f"{base_url}/$metadata#users/$entity",
                    "id": account.user_id,
                    "displayName": account.display_name or account.email.split("@")[0],
                    "mail": account.email,
                    "userPrincipalName": account.email,
                    "proxyAddresses": [f"SMTP:{account.email}"]
                    + [f"smtp:{a}" for a in account.proxy_addresses],
                }
            ), notify
        if lower[1] == "mailfolders":
            denied = need("mail.read")
            if denied:
                return denied, notify
            return self._folders(account, req, parts[2:], base_url), notify
        if method in ("POST", "PATCH") and len(req.body) > MAX_REQUEST_BYTES:
            return graph_error(
                413, "RequestEntityTooLarge", "The request size exceeds the maximum limit."
            ), notify
        if lower[1] == "sendmail" and method == "POST" and len(parts) == 2:
            denied = need("mail.send")
            if denied:
                return denied, notify
            if _is_mime(req):
                mime = self._mime_body(account, req)
                notify.extend(self._dispatch_raw(account, mime, True, None))
                return SubResponse(202, b""), notify
            data = self._json(req)
            message = _ci(data, "message")
            if not isinstance(message, dict):
                raise BadRequest("Message is required.")
            save = _ci(data, "saveToSentItems")
            notify.extend(self._send(account, message, save is not False, None))
            return SubResponse(202, b""), notify
        if lower[1] == "messages":
            denied = need("mail.read")
            if denied:
                return denied, notify
            if len(parts) == 2 and method == "GET":
                return self._list_messages(account, req, base_url), notify
            if len(parts) == 2 and method == "POST":
                if _is_mime(req):
                    draft = self._mime_draft(account, self._mime_body(account, req), None)
                else:
                    draft = self._draft(account, self._json(req), None)
                draft.keep_id = _immutable(req)
                return ok(draft.as_json(account), 201), notify
            message = account.messages.get(parts[2]) if len(parts) > 2 else None
            if message is None:
                return graph_error(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                ), notify
            if len(parts) == 3 and method == "GET":
                body = message.as_json(account)
                body["@odata.context"] = f"{base_url}/$metadata#users('me')/messages/$entity"
                return ok(_select(body, req)), notify
            if len(parts) == 3 and method == "PATCH":
                data = self._json(req)
                if "categories" in data:
                    message.categories = [str(c) for c in data["categories"] or []]
                if "isRead" in data:
                    message.is_read = bool(data["isRead"])
                if message.is_draft:
                    self._update_draft(account, message, data)
                self._change(account, message, "updated")
                notify.append(((account.email, message), "updated"))
                return ok(message.as_json(account)), notify
            if len(parts) == 3 and method == "DELETE":
                del account.messages[message.id]
                self._change(account, message, "deleted")
                return SubResponse(204, b""), notify
            if len(parts) == 4 and lower[3] == "$value" and method == "GET":
                return SubResponse(200, message.raw, {"Content-Type": "text/plain"}), notify
            if len(parts) == 4 and lower[3] == "createreply" and method == "POST":
                if _is_mime(req):
                    draft = self._mime_draft(account, self._mime_body(account, req), message)
                else:
                    draft = self._draft(account, self._json(req), message)
                draft.keep_id = _immutable(req)
                return ok(draft.as_json(account), 201), notify
            if len(parts) == 4 and lower[3] == "send" and method == "POST":
                denied = need("mail.send")
                if denied:
                    return denied, notify
                if not message.is_draft:
                    raise BadRequest("Only drafts can be sent.")
                notify.extend(self._send_draft(account, message))
                return SubResponse(202, b""), notify
        return graph_error(400, "BadRequest", f"Unsupported request: {req.method} {rest}"), notify

    def _list_messages(self, account: MsAccount, req: SubRequest, base_url: str) -> SubResponse:
        """GET me/messages: newest first; `$filter` on internetMessageId or receivedDateTime."""
        chosen = list(account.messages.values())  # every folder, Drafts included
        flt = (req.query.get("$filter") or [""])[0]
        if flt:
            by_id = _FILTER_MESSAGE_ID.fullmatch(flt.strip())
            since = _FILTER_SINCE.search(flt)
            if by_id:
                wanted = by_id.group(1).replace("''", "'")
                chosen = [m for m in chosen if m.internet_message_id == wanted]
            elif since:
                moment = parse_iso(since.group(2))
                chosen = [m for m in chosen if m.received >= moment]
            else:
                raise BadRequest("Unsupported $filter.")
        chosen.sort(key=lambda m: m.received, reverse=True)
        top = int((req.query.get("$top") or ["10"])[0])
        body = {
            "@odata.context": f"{base_url}/$metadata#users('me')/messages",
            "value": [_select(m.as_json(account), req) for m in chosen[:top]],
        }
        return ok(body)

    def _json(self, req: SubRequest) -> dict[str, Any]:
        if not req.body:
            return {}
        try:
            data = json.loads(req.body)
        except ValueError:
            raise BadRequest("Unable to read JSON request payload.") from None
        if not isinstance(data, dict):
            raise BadRequest("The request payload must be a JSON object.")
        return data

    # ------------------------------------------------------------------ folders and delta
    def _folders(
        self, account: MsAccount, req: SubRequest, parts: list[str], base_url: str
    ) -> SubResponse:
        if not parts or parts == [""]:
            return ok(
                {
                    "@odata.context": f"{base_url}/$metadata#users('me')/mailFolders",
                    "value": [_folder_json(f, account) for f in account.folders.values()],
                }
            )
        key = parts[0]
        match = re.fullmatch(r"\('([^']+)'\)", key) or re.fullmatch(r"'([^']+)'", key)
        try:
            folder = account.folder(match.group(1) if match else key)
        except KeyError:
            return graph_error(404, "ErrorInvalidIdMalformed", "Id is malformed.")
        if len(parts) == 1:
            return ok(_folder_json(folder, account))
        if (
            len(parts) == 3
            and parts[1].lower() == "messages"
            and parts[2].lower()
            in (
                "delta()",
                "delta",
                "microsoft.graph.delta()",
            )
        ):
            return self._delta(account, folder, req, base_url)
        return graph_error(400, "BadRequest", "Unsupported folder request.")

    def _delta(
        self, account: MsAccount, folder: Folder, req: SubRequest, base_url: str
    ) -> SubResponse:
        query = {k: v[0] for k, v in req.query.items()}
        prefer = _prefer(req.headers.get("prefer", ""))
        page = min(int(prefer.get("odata.maxpagesize", DEFAULT_PAGE) or DEFAULT_PAGE), MAX_PAGE)
        state: dict[str, Any]
        token = query.get("$deltatoken") or query.get("$skiptoken")
        if token:
            decoded = _decode_token(token)
            if decoded is None or decoded.get("folder") != folder.id:
                return graph_error(400, "ErrorInvalidUrlQuery", "The delta token is malformed.")
            state = decoded
            if int(state["from"]) < account.delta_floor:
                location = f"{base_url}/me/mailFolders('{folder.id}')/messages/delta()"
                return graph_error(
                    410,
                    "syncStateNotFound",
                    "The sync state generation is not found. Please resync.",
                    Location=location,
                )
            if "$deltatoken" in query:
                state = {
                    **state,
                    "from": state["to"],
                    "to": account.seq,
                    "offset": 0,
                    "initial": False,
                }
        else:
            since = None
            if "$filter" in query:
                match = _FILTER_SINCE.search(query["$filter"])
                if match is None:
                    raise BadRequest("Only receivedDateTime ge|gt is supported in $filter.")
                since = iso(parse_iso(match.group(2)))
            state = {
                "folder": folder.id,
                "from": max(account.delta_floor, 0),
                "to": account.seq,
                "offset": 0,
                "initial": True,
                "since": since,
                "removed_ok": True,
            }
        entries = self._delta_entries(account, folder, state)
        offset = int(state["offset"])
        chunk = entries[offset : offset + page]
        link_base = f"{base_url}/me/mailFolders('{folder.id}')/messages/delta()"
        body: dict[str, Any] = {
            "@odata.context": f"{base_url}/$metadata#Collection(message)",
            "value": chunk,
        }
        if offset + page < len(entries):
            next_state = {**state, "offset": offset + page}
            body["@odata.nextLink"] = f"{link_base}?$skiptoken={_encode_token(next_state)}"
        else:
            final = {**state, "offset": 0}
            body["@odata.deltaLink"] = f"{link_base}?$deltatoken={_encode_token(final)}"
        return ok(body)

    def _delta_entries(
        self, account: MsAccount, folder: Folder, state: dict[str, Any]
    ) -> list[dict[str, Any]]:
        upto = int(state["to"])
        since = parse_iso(state["since"]) if state.get("since") else None
        if state.get("initial"):
            chosen = [
                m
                for m in account.messages.values()
                if m.folder_id == folder.id
                and not m.is_draft
                and m.seq <= upto
                and (since is None or m.received >= since)
            ]
            chosen.sort(key=lambda m: m.received, reverse=True)
            return [m.as_json(account) for m in chosen]
        touched: dict[str, str] = {}
        for change in account.changes:
            if int(state["from"]) < change.seq <= upto and change.folder_id == folder.id:
                touched[change.message_id] = change.kind
        out: list[dict[str, Any]] = []
        for message_id, kind in touched.items():
            message = account.messages.get(message_id)
            if message is None or message.folder_id != folder.id or kind == "deleted":
                out.append(
                    {
                        "@odata.type": "#microsoft.graph.message",
                        "id": message_id,
                        "@removed": {"reason": "deleted" if message is None else "changed"},
                    }
                )
            elif not message.is_draft:
                out.append(message.as_json(account))
        return out

    # ------------------------------------------------------------------ storing and sending
    def _change(self, account: MsAccount, message: MsMessage, kind: str) -> None:
        account.seq += 1
        message.seq = account.seq
        message.change_key = secrets.token_urlsafe(8)
        account.changes.append(Change(account.seq, message.folder_id, message.id, kind))

    def _store(
        self,
        account: MsAccount,
        raw: bytes,
        folder: Folder,
        *,
        draft: bool = False,
        item_id: str | None = None,
    ) -> MsMessage:
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        message_id = (
            _MSGID.findall(str(parsed.get("message-id", "")))
            or [make_msgid(domain="sandbox.outlook.test")]
        )[0]
        related = set(
            _MSGID.findall(f"{parsed.get('in-reply-to', '')} {parsed.get('references', '')}")
        )
        conversation = (
            next(
                (
                    m.conversation_id
                    for m in account.messages.values()
                    if m.internet_message_id in related
                ),
                None,
            )
            or "AAQk" + base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
        )
        message = MsMessage(
            id=item_id or "AAkALg" + base64.urlsafe_b64encode(secrets.token_bytes(30)).decode(),
            folder_id=folder.id,
            conversation_id=conversation,
            raw=raw,
            received=datetime.now(UTC).replace(microsecond=0),
            internet_message_id=message_id,
            is_draft=draft,
        )
        account.messages[message.id] = message
        self._change(account, message, "created")
        return message

    def _mime(
        self, account: MsAccount, data: dict[str, Any], reply_to: MsMessage | None
    ) -> EmailMessage:
        mime = EmailMessage()
        mime["From"] = (
            f"{account.display_name} <{account.email}>" if account.display_name else account.email
        )
        for header, key in (
            ("To", "toRecipients"),
            ("Cc", "ccRecipients"),
            ("Bcc", "bccRecipients"),
        ):
            recipients = _ci(data, key) or []
            addresses = [
                str(r.get("emailAddress", {}).get("address", ""))
                for r in recipients
                if isinstance(r, dict)
            ]
            if any(addresses):
                mime[header] = ", ".join(a for a in addresses if a)
        subject = _ci(data, "subject")
        mime["Subject"] = str(subject) if subject is not None else ""
        mime["Date"] = format_datetime(datetime.now(UTC))
        mime["Message-ID"] = make_msgid(domain="sandbox.outlook.test")
        if reply_to is not None:
            original = reply_to.parsed()
            references = " ".join(
                filter(
                    None,
                    [str(original.get("references", "")).strip(), reply_to.internet_message_id],
                )
            )
            mime["In-Reply-To"] = reply_to.internet_message_id
            mime["References"] = references
        for header in _ci(data, "internetMessageHeaders") or []:
            name, value = str(header.get("name", "")), str(header.get("value", ""))
            if not name.lower().startswith("x-"):
                raise BadRequest("Only custom headers (x-...) can be set.")
            mime[name] = value
        body = _ci(data, "body") or {}
        content = str(body.get("content", "")) if isinstance(body, dict) else ""
        if isinstance(body, dict) and str(body.get("contentType", "text")).lower() == "html":
            mime.set_content(content, subtype="html")
        else:
            mime.set_content(content)
        return mime

    def _draft(
        self, account: MsAccount, data: dict[str, Any], reply_to: MsMessage | None
    ) -> MsMessage:
        if reply_to is not None:
            original = reply_to.parsed()
            sender = getaddresses([str(original.get("reply-to") or original.get("from", ""))])
            subject = str(original.get("subject", ""))
            comment = _ci(data, "comment")
            base = _ci(data, "message") or {}
            data = {
                "subject": subject if subject.lower().startswith("re:") else f"RE: {subject}",
                "toRecipients": [{"emailAddress": {"address": a}} for _, a in sender if a],
                "body": {"contentType": "text", "content": str(comment or "")},
                **(base if isinstance(base, dict) else {}),
            }
        draft = self._store(
            account,
            self._mime(account, data, reply_to).as_bytes(),
            account.folder("drafts"),
            draft=True,
        )
        if reply_to is not None:
            draft.conversation_id = reply_to.conversation_id
        return draft

    def _update_draft(self, account: MsAccount, draft: MsMessage, data: dict[str, Any]) -> None:
        """A PATCH on a draft rewrites what it names; threading headers stay."""
        current = email.message_from_bytes(draft.raw, policy=email.policy.default)
        fields = {k.lower(): v for k, v in data.items()}
        rebuilt = self._mime(
            account,
            {
                "subject": fields.get("subject", current.get("Subject", "")),
                "body": fields.get("body") or {"contentType": "text", "content": _text_of(current)},
                **{
                    key: fields.get(key.lower()) or _recipients_json(current, header)
                    for key, header in (
                        ("toRecipients", "To"),
                        ("ccRecipients", "Cc"),
                        ("bccRecipients", "Bcc"),
                    )
                },
            },
            None,
        )
        for header in ("Message-ID", "In-Reply-To", "References"):
            del rebuilt[header]
            if current.get(header):
                rebuilt[header] = str(current[header])
        draft.raw = rebuilt.as_bytes()

    def _send(
        self, account: MsAccount, data: dict[str, Any], save: bool, reply_to: MsMessage | None
    ) -> list[tuple[tuple[str, MsMessage], str]]:
        mime = self._mime(account, data, reply_to)
        if not any(mime.get(h) for h in ("To", "Cc", "Bcc")):
            raise BadRequest("At least one recipient is required, but none were found.")
        return self._dispatch(account, mime, save, reply_to.conversation_id if reply_to else None)

    def _send_draft(
        self, account: MsAccount, draft: MsMessage
    ) -> list[tuple[tuple[str, MsMessage], str]]:
        mime = email.message_from_bytes(draft.raw, policy=email.policy.default)
        assert isinstance(mime, EmailMessage)
        if not any(mime.get(h) for h in ("To", "Cc", "Bcc")):
            raise BadRequest("At least one recipient is required, but none were found.")
        del account.messages[draft.id]
        self._change(account, draft, "deleted")
        # The draft moves to Sent Items: its ImmutableId stays, a regular id does not.
        return self._dispatch_raw(
            account,
            draft.raw,
            True,
            draft.conversation_id,
            sent_id=draft.id if draft.keep_id else None,
        )

    def _mime_body(self, account: MsAccount, req: SubRequest) -> bytes:
        """A text/plain body: base64 MIME, as Graph documents for sendMail, POST messages
        and createReply; what the MIME lacks of From, Date and Message-ID is filled in."""
        try:
            raw = base64.b64decode(req.body.strip(), validate=True)
        except ValueError:
            raw = b""
        if not raw.strip():
            raise MimeInvalid()
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        if not parsed.keys():
            raise MimeInvalid()
        missing: list[tuple[str, str]] = []
        if not parsed["From"]:
            missing.append(("From", account.email))
        if not parsed["Date"]:
            missing.append(("Date", format_datetime(datetime.now(UTC))))
        if not parsed["Message-ID"]:
            missing.append(("Message-ID", make_msgid(domain="sandbox.outlook.test")))
        return prepend_headers(raw, missing)

    def _mime_draft(self, account: MsAccount, raw: bytes, reply_to: MsMessage | None) -> MsMessage:
        """A draft made from MIME, kept as it came; a reply draft joins the original's
        conversation and gets In-Reply-To/References when the MIME has none."""
        if reply_to is not None:
            parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
            extra: list[tuple[str, str]] = []
            if not parsed["In-Reply-To"]:
                extra.append(("In-Reply-To", reply_to.internet_message_id))
            if not parsed["References"]:
                original = reply_to.parsed()
                refs = [str(original.get("references", "")).strip(), reply_to.internet_message_id]
                extra.append(("References", " ".join(filter(None, refs))))
            raw = prepend_headers(raw, extra)
        draft = self._store(account, raw, account.folder("drafts"), draft=True)
        if reply_to is not None:
            draft.conversation_id = reply_to.conversation_id
        return draft

    def _dispatch_raw(
        self,
        account: MsAccount,
        raw: bytes,
        save: bool,
        conversation: str | None,
        *,
        sent_id: str | None = None,
    ) -> list[tuple[tuple[str, MsMessage], str]]:
        """Send MIME bytes as they are: the Sent Items copy keeps them (Bcc too), recipients
        get them without Bcc."""
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        recipients = [
            a.lower()
            for _, a in getaddresses(
                [str(v) for h in ("To", "Cc", "Bcc") for v in parsed.get_all(h, [])]
            )
            if a
        ]
        if not recipients:
            raise BadRequest("At least one recipient is required, but none were found.")
        notify: list[tuple[tuple[str, MsMessage], str]] = []
        if save:
            sent = self._store(account, raw, account.folder("sentitems"), item_id=sent_id)
            if conversation:
                sent.conversation_id = conversation
            notify.append(((account.email, sent), "created"))
        delivered = strip_header(raw, "Bcc")
        for address in dict.fromkeys(recipients):
            target = self.account(address)
            if target is not None:
                received = self._store(target, delivered, target.folder("inbox"))
                notify.append(((target.email, received), "created"))
            elif self.external_delivery is not None:
                self.external_delivery(address, delivered)
        return notify

    def _dispatch(
        self, account: MsAccount, mime: EmailMessage, save: bool, conversation: str | None
    ) -> list[tuple[tuple[str, MsMessage], str]]:
        notify: list[tuple[tuple[str, MsMessage], str]] = []
        recipients = [
            a.lower()
            for _, a in getaddresses(
                [str(v) for h in ("To", "Cc", "Bcc") for v in mime.get_all(h, [])]
            )
            if a
        ]
        if save:
            # The sender's copy keeps Bcc; the delivered copies do not.
            sent = self._store(account, mime.as_bytes(), account.folder("sentitems"))
            if conversation:
                sent.conversation_id = conversation
            notify.append(((account.email, sent), "created"))
        raw = _without_bcc(mime)
        for address in dict.fromkeys(recipients):
            target = self.account(address)
            if target is not None:
                received = self._store(target, raw, target.folder("inbox"))
                notify.append(((target.email, received), "created"))
            elif self.external_delivery is not None:
                self.external_delivery(address, raw)
        return notify

    # ------------------------------------------------------------------ subscriptions
    async def _subscriptions(self, account: MsAccount, req: SubRequest, rest: str) -> SubResponse:
        parts = rest.split("/")
        method = req.method.upper()
        if len(parts) == 1 and method == "POST":
            data = self._json(req)
            resource = str(data.get("resource") or "")
            if not (_FOLDER_RESOURCE.match(resource) or _ALL_MESSAGES.match(resource)):
                raise BadRequest(f"Unsupported resource '{resource}'.")
            change_types = [
                c.strip() for c in str(data.get("changeType") or "").split(",") if c.strip()
            ]
            if not change_types or not set(change_types) <= {"created", "updated", "deleted"}:
                raise BadRequest("changeType must list created, updated or deleted.")
            notification_url = str(data.get("notificationUrl") or "")
            lifecycle_url = data.get("lifecycleNotificationUrl")
            client_state = data.get("clientState")
            if client_state is not None and len(str(client_state)) > 128:
                raise BadRequest("clientState must be at most 128 characters.")
            expires = self._expiry(data.get("expirationDateTime"))
            for url in filter(None, [notification_url, lifecycle_url]):
                if not await self._validate(str(url)):
                    return graph_error(
                        400,
                        "ValidationError",
                        f"Subscription validation request failed. Notification endpoint must "
                        f"respond with 200 OK to validation request: {url}",
                    )
            subscription = Subscription(
                id=str(uuid.uuid4()),
                account=account.email,
                resource=resource,
                change_types=change_types,
                notification_url=notification_url,
                lifecycle_url=str(lifecycle_url) if lifecycle_url else None,
                client_state=str(client_state) if client_state is not None else None,
                expires=expires,
            )
            with self._lock:
                self.subscriptions[subscription.id] = subscription
            return ok(subscription.as_json(), 201)
        existing = self.subscriptions.get(parts[1]) if len(parts) > 1 else None
        if existing is None or existing.account != account.email:
            return graph_error(404, "ResourceNotFound", "The object was not found.")
        if len(parts) == 2 and method == "GET":
            return ok(existing.as_json())
        if len(parts) == 2 and method == "PATCH":
            existing.expires = self._expiry(self._json(req).get("expirationDateTime"))
            return ok(existing.as_json())
        if len(parts) == 2 and method == "DELETE":
            self.subscriptions.pop(existing.id, None)
            return SubResponse(204, b"")
        if len(parts) == 3 and parts[2].lower() == "reauthorize" and method == "POST":
            return SubResponse(204, b"")
        return graph_error(400, "BadRequest", "Unsupported subscription request.")

    def _expiry(self, value: Any) -> datetime:
        if not value:
            raise BadRequest("expirationDateTime is required.")
        try:
            expires = parse_iso(str(value))
        except ValueError:
            raise BadRequest("expirationDateTime is not a valid date.") from None
        latest = datetime.now(UTC) + timedelta(minutes=self.subscription_max_minutes)
        if expires > latest + timedelta(minutes=1):
            raise BadRequest(
                f"Subscription expiration can only be {self.subscription_max_minutes} minutes "
                "in the future."
            )
        if expires <= datetime.now(UTC):
            raise BadRequest("expirationDateTime must be in the future.")
        return expires

    async def _validate(self, url: str) -> bool:
        if self.poster is None:
            return False
        token = "Validation: Testing client application reachability " + secrets.token_hex(8)
        sep = "&" if "?" in url else "?"
        try:
            status, text = await asyncio.wait_for(
                self.poster(f"{url}{sep}validationToken={quote(token)}", None), timeout=10
            )
        except (TimeoutError, OSError):
            return False
        return status == 200 and text == token

    def _notify(self, account: MsAccount, message: MsMessage, kind: str) -> None:
        """Change notifications for every subscription watching this message's folder."""
        folder = account.folders.get(message.folder_id)
        for subscription in list(self.subscriptions.values()):
            if subscription.account != account.email or kind not in subscription.change_types:
                continue
            if subscription.expires <= datetime.now(UTC):
                continue
            key = subscription.folder_key()
            if (
                key is not None
                and folder is not None
                and key not in (folder.id.lower(), folder.well_known)
            ):
                continue
            body = {
                "value": [
                    {
                        "subscriptionId": subscription.id,
                        "subscriptionExpirationDateTime": iso(subscription.expires),
                        "changeType": kind,
                        "resource": f"Users/{account.user_id}/Messages/{message.id}",
                        "resourceData": {
                            "@odata.type": "#Microsoft.Graph.Message",
                            "@odata.id": f"Users/{account.user_id}/Messages/{message.id}",
                            "@odata.etag": f'W/"{message.change_key}"',
                            "id": message.id,
                        },
                        "clientState": subscription.client_state,
                        "tenantId": self.tenant_id,
                    }
                ]
            }
            self._post_later(subscription.notification_url, body)

    def lifecycle(self, subscription_id: str, event: str) -> None:
        """Send a lifecycle event; `subscriptionRemoved` also drops the subscription."""
        subscription = self.subscriptions.get(subscription_id)
        if subscription is None:
            raise KeyError(subscription_id)
        if event == "subscriptionRemoved":
            self.subscriptions.pop(subscription_id, None)
        body = {
            "value": [
                {
                    "subscriptionId": subscription.id,
                    "subscriptionExpirationDateTime": iso(subscription.expires),
                    "tenantId": self.tenant_id,
                    "clientState": subscription.client_state,
                    "lifecycleEvent": event,
                }
            ]
        }
        self._post_later(subscription.lifecycle_url or subscription.notification_url, body)

    def _post_later(self, url: str, body: dict[str, Any]) -> None:
        if self.poster is None:
            return
        poster = self.poster

        async def deliver() -> None:
            # Graph retries a notification that is not acknowledged with a 2xx.
            for attempt in range(4):
                try:
                    status, _ = await poster(url, body)
                except OSError:
                    status = 0
                if 200 <= status < 300:
                    self.notifications_sent += 1
                    return
                if status in (400, 403, 404):
                    return
                await asyncio.sleep(0.5 * 2**attempt)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(deliver())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain_notifications(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _text_of(message: Message) -> str:
    assert isinstance(message, EmailMessage)
    body = message.get_body(preferencelist=("plain", "html"))
    return str(body.get_content()) if body is not None else ""


def _recipients_json(message: Message, header: str) -> list[dict[str, Any]]:
    return [
        {"emailAddress": {"address": address, "name": name}}
        for name, address in getaddresses([str(v) for v in message.get_all(header, [])])
        if address
    ]


def _without_bcc(mime: EmailMessage) -> bytes:
    copy = email.message_from_bytes(mime.as_bytes(), policy=email.policy.default)
    del copy["Bcc"]
    return copy.as_bytes()


def _prefer(header: str) -> dict[str, str]:
    """`Prefer` values, comma-joined by the SDK: odata.maxpagesize=2, IdType="ImmutableId"."""
    out: dict[str, str] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name:
            out[name.strip().lower()] = value.strip().strip('"')
    return out


def _select(body: dict[str, Any], req: SubRequest) -> dict[str, Any]:
    fields = (req.query.get("$select") or [""])[0]
    if not fields:
        return body
    wanted = {f.strip().lower() for f in fields.split(",")} | {"id"}
    return {k: v for k, v in body.items() if k.startswith("@") or k.lower() in wanted}


def _folder_json(folder: Folder, account: MsAccount) -> dict[str, Any]:
    count = sum(1 for m in account.messages.values() if m.folder_id == folder.id)
    return {
        "id": folder.id,
        "displayName": folder.display_name,
        "parentFolderId": "AAMkADroot",
        "childFolderCount": 0,
        "unreadItemCount": 0,
        "totalItemCount": count,
        "isHidden": False,
    }


def _consent_page(tenant: str, query: dict[str, str]) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in query.items()
        if k not in ("login_hint", "decision")
    )
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in query.get("scope", "").split())
    return (
        "<!doctype html><title>Sign in to your account (sandbox)</title>"
        "<h1>Pick an account</h1><p>mailsync wants to:</p><ul>" + scopes + "</ul>"
        f'<form method="get" action="/{html.escape(tenant)}/oauth2/v2.0/authorize">'
        + hidden
        + '<input name="login_hint" type="email" placeholder="you@contoso.com" required> '
        '<button name="decision" value="allow">Accept</button> '
        '<button name="decision" value="deny" formnovalidate>Cancel</button></form>'
    )
