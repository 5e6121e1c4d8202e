"""Google OAuth 2.0 and the Gmail API v1, in memory, for the calls mailsync makes.

State lives in one `GoogleSandbox`; every request, plain or inside a batch, goes through
`handle`, so faults, quotas and authentication behave the same on every path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import email.utils
import html
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import Any
from urllib.parse import urlencode

from backend.sandbox.faults import Fault, FaultTable
from backend.sandbox.wire import (
    SubRequest,
    SubResponse,
    boundary_of,
    prepend_headers,
    split_multipart,
    strip_header,
)

log = logging.getLogger(__name__)

SCOPE_PREFIX = "https://www.googleapis.com/auth/"
FULL_ACCESS = {"https://mail.google.com/", SCOPE_PREFIX + "gmail.modify"}
READ_SCOPES = FULL_ACCESS | {SCOPE_PREFIX + "gmail.readonly", SCOPE_PREFIX + "gmail.metadata"}
SEND_SCOPES = FULL_ACCESS | {SCOPE_PREFIX + "gmail.send", SCOPE_PREFIX + "gmail.compose"}
INSERT_SCOPES = FULL_ACCESS | {SCOPE_PREFIX + "gmail.insert"}
LABEL_SCOPES = FULL_ACCESS | {SCOPE_PREFIX + "gmail.labels"}
SYSTEM_LABELS = (
    "INBOX",
    "SENT",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "TRASH",
    "SPAM",
    "DRAFT",
    "CHAT",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
)
# Quota units per method (developers.google.com/workspace/gmail/api/reference/quota).
COSTS = {
    "profile": 1,
    "history": 2,
    "labels.get": 1,
    "labels.list": 1,
    "labels.create": 5,
    "settings.sendAs.list": 1,
    "messages.attachments.get": 5,
    "messages.get": 5,
    "messages.list": 5,
    "messages.modify": 5,
    "messages.trash": 5,
    "messages.delete": 10,
    "messages.batchModify": 50,
    "messages.send": 100,
    "messages.insert": 25,
    "messages.import": 25,
    "stop": 50,
    "watch": 100,
}
# The per-user rate limit of the same page: 15,000 units per user per minute. Exceeding it
# answers `userRateLimitExceeded` (a lone call: 403) or 429 "Too many requests" (a call
# inside a batch: Gmail's batching guide warns that large batches trigger rate limiting),
# without a Retry-After: the error guide asks clients for exponential backoff.
QUOTA_UNITS = 15_000
QUOTA_WINDOW_SECONDS = 60.0
# Sending limits (docs/providers.md, "Sending"): the discovery document's maxSize for
# messages.send uploads; "Gmail sending limits in Google Workspace" for the rest.
MAX_SEND_BYTES = 36_700_160
MAX_RECIPIENTS = 100  # per message sent through the Gmail API
DAILY_SEND_LIMIT = 2000  # messages per rolling 24 hours (500 for trial accounts)
DAY = 86_400.0
TOPIC = re.compile(r"^projects/[^/]+/topics/[^/]+$")
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv|antw)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_ids = itertools.count(int(time.time() * 1000) << 12)


def new_id() -> str:
    return f"{next(_ids):x}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def unb64url(data: str) -> bytes:
    data = data.strip()
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def normalize_subject(subject: str | None) -> str:
    return _REPLY_PREFIX.sub("", subject or "").strip().lower()


def message_ids(value: str | None) -> list[str]:
    return re.findall(r"<[^<>\s]+>", value or "")


ERROR_INFO = {
    "rateLimitExceeded": "RATE_LIMIT_EXCEEDED",
    "userRateLimitExceeded": "RATE_LIMIT_EXCEEDED",
    "dailyLimitExceeded": "RATE_LIMIT_EXCEEDED",
    "quotaExceeded": "RATE_LIMIT_EXCEEDED",
    "insufficientPermissions": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
}


def error(
    status: int, message: str, reason: str, *, domain: str = "global", **headers: str
) -> SubResponse:
    statuses = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        409: "ALREADY_EXISTS",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
    }
    body: dict[str, Any] = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
            "status": statuses.get(status, "UNKNOWN"),
        }
    }
    info = ERROR_INFO.get(reason)
    if info is not None:
        # Google's quota answers also carry a google.rpc.ErrorInfo under `details`, whose
        # reason is the upper-case one; google-api-python-client reads `details` first.
        body["error"]["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": info,
                "domain": "googleapis.com",
                "metadata": {"service": "gmail.googleapis.com"},
            }
        ]
    return SubResponse(status, json.dumps(body).encode(), dict(headers))


def ok(data: Any, status: int = 200) -> SubResponse:
    return SubResponse(status, json.dumps(data).encode())


@dataclass
class StoredMessage:
    id: str
    thread_id: str
    label_ids: list[str]
    raw: bytes
    internal_date_ms: int
    history_id: int
    header_message_id: str | None
    subject: str

    def parsed(self) -> Message:
        return email.message_from_bytes(self.raw, policy=email.policy.compat32)

    def ref(self) -> dict[str, Any]:
        return {"id": self.id, "threadId": self.thread_id}

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "threadId": self.thread_id, "labelIds": list(self.label_ids)}


@dataclass
class HistoryRecord:
    id: int
    kind: str  # messageAdded, messageDeleted, labelAdded, labelRemoved
    message: dict[str, Any]
    label_ids: list[str] = field(default_factory=list)

    def as_json(self, with_labels: bool = True) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": str(self.id),
            "messages": [{"id": self.message["id"], "threadId": self.message["threadId"]}],
        }
        key = {
            "messageAdded": "messagesAdded",
            "messageDeleted": "messagesDeleted",
            "labelAdded": "labelsAdded",
            "labelRemoved": "labelsRemoved",
        }[self.kind]
        message = self.message
        if not with_labels:
            message = {k: v for k, v in message.items() if k != "labelIds"}
        entry: dict[str, Any] = {"message": message}
        if self.kind.startswith("label"):
            entry["labelIds"] = self.label_ids
        record[key] = [entry]
        return record


@dataclass
class Watch:
    topic: str
    label_ids: list[str]
    behavior: str
    expiration_ms: int

    def wants(self, labels: list[str]) -> bool:
        if not self.label_ids:
            return True
        hit = bool(set(self.label_ids) & set(labels))
        return hit if self.behavior == "include" else not hit


@dataclass
class Account:
    email: str
    aliases: list[str] = field(default_factory=list)
    display_name: str = ""
    history_id: int = field(default_factory=lambda: 1000 + secrets.randbelow(100_000))
    # history.list answers 404 for a startHistoryId below this (the configurable horizon).
    history_floor: int = 0
    history: list[HistoryRecord] = field(default_factory=list)
    messages: dict[str, StoredMessage] = field(default_factory=dict)
    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    watch: Watch | None = None
    daily_send_limit: int = DAILY_SEND_LIMIT
    sent_at: list[float] = field(default_factory=list)  # send times in the last 24 hours
    # (time, units) charged within the last quota window, oldest first.
    quota_spent: deque[tuple[float, int]] = field(default_factory=deque)
    # A per-account quota (units per window of seconds), set by the admin action `quota`;
    # None: the sandbox's own.
    quota: tuple[int, float] | None = None
    rate_limited: int = 0  # calls refused for quota, for tests
    last_push: float = float("-inf")
    push_pending: bool = False
    pushes_dropped: int = 0
    # False: history records name their messages without `labelIds`, as Gmail sometimes
    # answers (clients are to look the message up).
    history_labels: bool = True

    def __post_init__(self) -> None:
        self.history_floor = self.history_id
        for name in SYSTEM_LABELS:
            self.labels[name] = {"id": name, "name": name, "type": "system"}

    def addresses(self) -> set[str]:
        return {self.email, *self.aliases}


@dataclass
class Grant:
    email: str
    client_id: str
    scopes: list[str]
    refresh_token: str
    revoked: bool = False


@dataclass
class AccessToken:
    grant: Grant
    expires_at: float


@dataclass
class AuthCode:
    grant: Grant
    redirect_uri: str
    expires_at: float


PushSink = Callable[[str, dict[str, Any]], Any]


class GoogleSandbox:
    def __init__(
        self,
        *,
        access_token_ttl: int = 3600,
        push_min_interval: float = 1.0,
        quota_units: int = QUOTA_UNITS,
        quota_window_seconds: float = QUOTA_WINDOW_SECONDS,
        merge_pushes: bool = False,
    ) -> None:
        self.access_token_ttl = access_token_ttl
        self.push_min_interval = push_min_interval
        self.merge_pushes = merge_pushes
        # Topics gmail-api-push@system.gserviceaccount.com may not publish to: watch → 403.
        self.unpublishable: set[str] = set()
        # Per user: `quota_units` within any `quota_window_seconds` (Gmail: 15,000 a minute).
        self.quota_units = quota_units
        self.quota_window_seconds = quota_window_seconds
        self.accounts: dict[str, Account] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.grants: dict[str, Grant] = {}
        self.codes: dict[str, AuthCode] = {}
        self.faults = FaultTable()
        # Pub/Sub push subscriptions: topic (or "*") -> push endpoint URL.
        self.push_endpoints: dict[str, str] = {}
        self.push_sink: PushSink | None = None
        # Mail to an address no Google account holds (the Microsoft sandbox, when both run).
        self.external_delivery: Callable[[str, bytes], bool] | None = None
        self.pushes_sent = 0
        self._push_tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ accounts (admin)
    def account(self, address: str) -> Account | None:
        address = address.strip().lower()
        found = self.accounts.get(address)
        if found is not None:
            return found
        return next((a for a in self.accounts.values() if address in a.aliases), None)

    def ensure_account(
        self, address: str, aliases: list[str] | None = None, name: str = ""
    ) -> Account:
        with self._lock:
            address = address.strip().lower()
            found = self.accounts.get(address)
            if found is None:
                found = self.accounts[address] = Account(address, display_name=name)
            if aliases is not None:
                found.aliases = [a.strip().lower() for a in aliases]
            if name:
                found.display_name = name
            return found

    def mint_token(self, address: str, scopes: list[str] | None = None) -> str:
        """An access token for an account without the consent dance (tests, traffic)."""
        account = self.ensure_account(address)
        grant = self._grant(account.email, "sandbox-admin", scopes or ["https://mail.google.com/"])
        return self._access_token(grant)

    def revoke_account(self, address: str) -> None:
        """Like the user removing access in their Google account: every token stops working."""
        with self._lock:
            for grant in self.grants.values():
                if grant.email == address.lower():
                    grant.revoked = True

    def expire_access_tokens(self, address: str) -> None:
        with self._lock:
            for token in self.access_tokens.values():
                if token.grant.email == address.lower():
                    token.expires_at = 0

    def expire_history(self, address: str) -> None:
        """Move the horizon past every history id handed out so far (history.list → 404)."""
        with self._lock:
            account = self._require(address)
            account.history_id += 1
            account.history_floor = account.history_id
            account.history.clear()

    def deliver(self, address: str, raw: bytes, labels: list[str] | None = None) -> StoredMessage:
        """Mail arriving from outside, as messages.insert would put it."""
        with self._lock:
            account = self._require(address)
            return self._store(account, raw, labels or ["INBOX", "UNREAD"], received=True)

    def _require(self, address: str) -> Account:
        account = self.account(address)
        if account is None:
            raise KeyError(address)
        return account

    # ------------------------------------------------------------------ OAuth
    def _grant(self, address: str, client_id: str, scopes: list[str]) -> Grant:
        grant = Grant(address, client_id, scopes, "1//sandbox-" + secrets.token_urlsafe(24))
        self.grants[grant.refresh_token] = grant
        return grant

    def _access_token(self, grant: Grant) -> str:
        token = "ya29.sandbox-" + secrets.token_urlsafe(24)
        self.access_tokens[token] = AccessToken(grant, time.time() + self.access_token_ttl)
        return token

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], str]:
        """GET /o/oauth2/v2/auth: approve the account in `login_hint` and send the user back."""
        client_id, redirect_uri = query.get("client_id"), query.get("redirect_uri")
        if not client_id or not redirect_uri:
            return 400, {}, "Error 400: invalid_request (client_id and redirect_uri are required)"

        def back(**params: str) -> tuple[int, dict[str, str], str]:
            if "state" in query:
                params["state"] = query["state"]
            sep = "&" if "?" in redirect_uri else "?"
            return 302, {"location": f"{redirect_uri}{sep}{urlencode(params)}"}, ""

        if query.get("response_type") != "code":
            return back(error="unsupported_response_type")
        scopes = query.get("scope", "").split()
        if not scopes:
            return back(error="invalid_scope")
        hint = (query.get("login_hint") or "").strip().lower()
        if not hint or "@" not in hint:
            return 200, {"content-type": "text/html"}, consent_page(query)
        fault = self.faults.take(hint, "GET", "/o/oauth2/v2/auth")
        if fault is not None and fault.status:
            return back(error=fault.reason or "access_denied")
        if query.get("decision") == "deny":
            return back(error="access_denied")
        with self._lock:
            account = self.ensure_account(hint)
            grant = self._grant(account.email, client_id, scopes)
            code = "4/sandbox-" + secrets.token_urlsafe(24)
            self.codes[code] = AuthCode(grant, redirect_uri, time.time() + 600)
        return back(code=code, scope=" ".join(scopes))

    def token(self, form: dict[str, str], basic_client: str | None) -> SubResponse:
        """POST /token: the authorization_code and refresh_token grants."""

        def oauth_error(name: str, description: str, status: int = 400) -> SubResponse:
            body = {"error": name, "error_description": description}
            return SubResponse(status, json.dumps(body).encode())

        client_id = form.get("client_id") or basic_client
        grant_type = form.get("grant_type")
        with self._lock:
            if grant_type == "authorization_code":
                auth = self.codes.pop(form.get("code", ""), None)
                if auth is None or auth.expires_at < time.time():
                    return oauth_error("invalid_grant", "Malformed auth code.")
                if auth.grant.client_id != client_id:
                    return oauth_error("invalid_client", "The OAuth client was not found.", 401)
                if auth.redirect_uri != form.get("redirect_uri"):
                    return oauth_error("redirect_uri_mismatch", "Bad Request")
                grant = auth.grant
                fault = self.faults.take(grant.email, "POST", "/token")
                if fault is not None and fault.status:
                    return oauth_error(
                        fault.reason or "invalid_grant",
                        fault.message or "Bad Request",
                        fault.status,
                    )
                body = self._token_body(grant, grant.scopes)
                body["refresh_token"] = grant.refresh_token
                return ok(body)
            if grant_type == "refresh_token":
                grant_or_none = self.grants.get(form.get("refresh_token", ""))
                if grant_or_none is None or grant_or_none.revoked:
                    return oauth_error("invalid_grant", "Token has been expired or revoked.")
                grant = grant_or_none
                if grant.client_id != client_id and grant.client_id != "sandbox-admin":
                    return oauth_error("unauthorized_client", "Unauthorized")
                fault = self.faults.take(grant.email, "POST", "/token")
                if fault is not None and fault.status:
                    return oauth_error(
                        fault.reason or "invalid_grant",
                        fault.message or "Bad Request",
                        fault.status,
                    )
                asked = form.get("scope", "").split()
                return ok(
                    self._token_body(
                        grant, asked if set(asked) <= set(grant.scopes) and asked else grant.scopes
                    )
                )
        return oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def _token_body(self, grant: Grant, scopes: list[str]) -> dict[str, Any]:
        return {
            "access_token": self._access_token(grant),
            "expires_in": self.access_token_ttl,
            "scope": " ".join(scopes),
            "token_type": "Bearer",
        }

    def revoke(self, token: str) -> SubResponse:
        with self._lock:
            grant = self.grants.get(token)
            if grant is None and token in self.access_tokens:
                grant = self.access_tokens[token].grant
            if grant is None:
                return SubResponse(
                    400,
                    b'{"error": "invalid_token", "error_description": "Token expired or revoked"}',
                )
            grant.revoked = True
            return ok({})

    # ------------------------------------------------------------------ the API
    async def handle(self, request: SubRequest) -> SubResponse:
        path = request.path
        token = self._bearer(request.headers.get("authorization"))
        fault = self.faults.take(token.grant.email if token else None, request.method, path)
        if fault is not None:
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            if fault.after:
                answer = await self._answer(request, token)
                await asyncio.sleep(fault.after_delay_seconds or 0)
                return self._fault_response(fault) if fault.status else answer
            if fault.status:
                return self._fault_response(fault)
        return await self._answer(request, token)

    async def _answer(self, request: SubRequest, token: AccessToken | None) -> SubResponse:
        path = request.path
        if token is None or token.grant.revoked or token.expires_at < time.time():
            return error(
                401,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                "authError",
                **{"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        upload = path.startswith("/upload/")
        route = path.removeprefix("/upload").removeprefix("/gmail/v1/users/")
        user, _, rest = route.partition("/")
        with self._lock:
            account = self.accounts.get(token.grant.email)
            if account is None or (user != "me" and user.lower() not in account.addresses()):
                return error(403, "Delegation denied for " + token.grant.email, "forbidden")
            try:
                return self._route(account, token.grant.scopes, request, rest, upload)
            except BadRequest as exc:
                return error(400, str(exc), "invalidArgument")

    def _fault_response(self, fault: Fault) -> SubResponse:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(int(fault.retry_after))
        reason = fault.reason or {401: "authError", 403: "forbidden", 429: "rateLimitExceeded"}.get(
            fault.status, "backendError"
        )
        # The bodies of Gmail's error guide (developers.google.com/workspace/gmail/api/guides/
        # handle-errors).
        message = fault.message or {
            "rateLimitExceeded": "Rate Limit Exceeded",
            "userRateLimitExceeded": "User Rate Limit Exceeded",
            "dailyLimitExceeded": "Daily Limit Exceeded",
            "domainPolicy": "The domain administrators have disabled Gmail apps.",
            "insufficientPermissions": "Request had insufficient authentication scopes.",
            "forbidden": "Forbidden",
        }.get(reason, "Backend Error")
        domain = "usageLimits" if "Limit" in reason else "global"
        return error(fault.status, message, reason, domain=domain, **headers)

    def _bearer(self, header: str | None) -> AccessToken | None:
        if not header or not header.lower().startswith("bearer "):
            return None
        return self.access_tokens.get(header[7:].strip())

    def set_quota(self, address: str, units: int | None, window_seconds: float = 60.0) -> None:
        """A quota of its own for one account (tests: the same rule over a shorter window)."""
        with self._lock:
            account = self._require(address)
            account.quota = None if units is None else (units, window_seconds)
            account.quota_spent.clear()

    def spend_quota(self, address: str, units: int) -> None:
        """Quota used by another client of the same user (the limit is per user, not per app)."""
        with self._lock:
            self._require(address).quota_spent.append((time.monotonic(), units))

    def _charge(self, account: Account, method: str, in_batch: bool = False) -> SubResponse | None:
        units, window = account.quota or (self.quota_units, self.quota_window_seconds)
        moment = time.monotonic()
        spent = account.quota_spent
        while spent and spent[0][0] <= moment - window:
            spent.popleft()
        cost = COSTS[method]
        if sum(c for _, c in spent) + cost > units:
            account.rate_limited += 1
            if in_batch:
                return error(429, "Too many requests", "rateLimitExceeded", domain="usageLimits")
            return error(
                403, "User-rate limit exceeded.", "userRateLimitExceeded", domain="usageLimits"
            )
        spent.append((moment, cost))
        return None

    def _route(
        self, account: Account, scopes: list[str], req: SubRequest, rest: str, upload: bool
    ) -> SubResponse:
        method = req.method
        parts = rest.split("/")

        def need(allowed: set[str]) -> SubResponse | None:
            if allowed & set(scopes):
                return None
            return error(
                403, "Request had insufficient authentication scopes.", "insufficientPermissions"
            )

        def charged(
            name: str, allowed: set[str], handler: Callable[[], SubResponse]
        ) -> SubResponse:
            return (
                need(allowed)
                or self._charge(account, name, in_batch=req.content_id is not None)
                or handler()
            )

        if rest == "profile" and method == "GET":
            return charged("profile", READ_SCOPES | SEND_SCOPES, lambda: self._profile(account))
        if rest == "settings/sendAs" and method == "GET":
            return charged("settings.sendAs.list", READ_SCOPES, lambda: self._send_as(account))
        if rest == "history" and method == "GET":
            return charged("history", READ_SCOPES, lambda: self._history(account, req.query))
        if rest == "watch" and method == "POST":
            return charged("watch", READ_SCOPES, lambda: self._watch(account, req.body))
        if rest == "stop" and method == "POST":

            def stop() -> SubResponse:
                account.watch = None
                return SubResponse(204, b"")

            return charged("stop", READ_SCOPES, stop)
        if parts[0] == "labels":
            if len(parts) == 1 and method == "GET":
                return charged(
                    "labels.list",
                    READ_SCOPES | LABEL_SCOPES,
                    lambda: ok({"labels": list(account.labels.values())}),
                )
            if len(parts) == 1 and method == "POST":
                return charged(
                    "labels.create", LABEL_SCOPES, lambda: self._create_label(account, req.body)
                )
            if len(parts) == 2 and method == "GET":
                label = account.labels.get(parts[1])
                return charged(
                    "labels.get",
                    READ_SCOPES | LABEL_SCOPES,
                    lambda: (
                        ok(label)
                        if label
                        else error(404, "Requested entity was not found.", "notFound")
                    ),
                )
        if parts[0] != "messages":
            return error(404, f"Not found: {req.path}", "notFound")
        if len(parts) == 1:
            if method == "GET":
                return charged("messages.list", READ_SCOPES, lambda: self._list(account, req.query))
            if method == "POST":
                return charged(
                    "messages.insert",
                    INSERT_SCOPES,
                    lambda: self._insert(account, req, upload, imported=False),
                )
        if len(parts) == 2 and method == "POST" and parts[1] == "batchModify":
            return charged(
                "messages.batchModify",
                FULL_ACCESS | LABEL_SCOPES,
                lambda: self._batch_modify(account, req.body),
            )
        if len(parts) == 2 and method == "POST" and parts[1] in ("send", "import"):
            if parts[1] == "send":
                return charged(
                    "messages.send", SEND_SCOPES, lambda: self._send(account, req, upload)
                )
            return charged(
                "messages.import",
                INSERT_SCOPES,
                lambda: self._insert(account, req, upload, imported=True),
            )
        message = account.messages.get(parts[1]) if len(parts) > 1 else None
        if message is None:
            return error(404, "Requested entity was not found.", "notFound")
        if len(parts) == 2 and method == "GET":
            return charged(
                "messages.get", READ_SCOPES, lambda: ok(self._render(message, req.query))
            )
        if len(parts) == 2 and method == "DELETE":
            return charged("messages.delete", FULL_ACCESS, lambda: self._delete(account, message))
        if len(parts) == 3 and method == "POST" and parts[2] == "modify":
            return charged(
                "messages.modify",
                FULL_ACCESS | LABEL_SCOPES,
                lambda: self._modify(account, message, req.body),
            )
        if len(parts) == 3 and method == "POST" and parts[2] == "trash":
            return charged(
                "messages.trash",
                FULL_ACCESS,
                lambda: self._relabel(account, message, ["TRASH"], ["INBOX"]),
            )
        if len(parts) == 4 and parts[2] == "attachments" and method == "GET":
            return charged(
                "messages.attachments.get", READ_SCOPES, lambda: self._attachment(message, parts[3])
            )
        return error(404, f"Not found: {req.path}", "notFound")

    # ------------------------------------------------------------------ handlers
    def _profile(self, account: Account) -> SubResponse:
        return ok(
            {
                "emailAddress": account.email,
                "messagesTotal": len(account.messages),
                "threadsTotal": len({m.thread_id for m in account.messages.values()}),
                "historyId": str(account.history_id),
            }
        )

    def _send_as(self, account: Account) -> SubResponse:
        entries = [
            {
                "sendAsEmail": account.email,
                "displayName": account.display_name,
                "isPrimary": True,
                "isDefault": True,
            }
        ]
        for alias in account.aliases:
            entries.append(
                {
                    "sendAsEmail": alias,
                    "displayName": account.display_name,
                    "treatAsAlias": True,
                    "verificationStatus": "accepted",
                }
            )
        return ok({"sendAs": entries})

    def _history(self, account: Account, query: dict[str, list[str]]) -> SubResponse:
        raw_start = first(query, "startHistoryId")
        if raw_start is None:
            raise BadRequest("Missing required parameter: startHistoryId")
        try:
            start = int(raw_start)
        except ValueError:
            raise BadRequest("Invalid startHistoryId") from None
        if start < account.history_floor or start > account.history_id:
            return error(404, "Requested entity was not found.", "notFound")
        types = set(query.get("historyTypes", []))
        label = first(query, "labelId")
        limit = min(int(first(query, "maxResults") or 100), 500)
        after = int(first(query, "pageToken") or start)
        matching = [
            r
            for r in account.history
            if r.id > after
            and (not types or r.kind in types)
            and (label is None or label in r.message.get("labelIds", []) or label in r.label_ids)
        ]
        page = matching[:limit]
        body: dict[str, Any] = {"historyId": str(account.history_id)}
        if page:
            body["history"] = [r.as_json(account.history_labels) for r in page]
        if len(matching) > limit:
            body["nextPageToken"] = str(page[-1].id)
        return ok(body)

    def _watch(self, account: Account, body: bytes) -> SubResponse:
        data = json_body(body)
        topic = str(data.get("topicName", ""))
        if not TOPIC.match(topic):
            raise BadRequest(f"Invalid topicName does not match projects/*/topics/*: {topic}")
        behavior = str(
            data.get("labelFilterBehavior") or data.get("labelFilterAction") or "include"
        ).lower()
        if behavior not in ("include", "exclude"):
            raise BadRequest("Invalid labelFilterBehavior")
        if topic in self.unpublishable:
            return error(
                403,
                f"Error sending test message to Cloud PubSub {topic} : User not authorized to "
                "perform this action.",
                "forbidden",
            )
        expiration = int((time.time() + 7 * 86400) * 1000)
        account.watch = Watch(topic, list(data.get("labelIds") or []), behavior, expiration)
        return ok({"historyId": str(account.history_id), "expiration": str(expiration)})

    def _create_label(self, account: Account, body: bytes) -> SubResponse:
        data = json_body(body)
        name = str(data.get("name", "")).strip()
        if not name:
            raise BadRequest("Invalid label name")
        if any(label["name"].lower() == name.lower() for label in account.labels.values()):
            return error(409, "Label name exists or conflicts", "alreadyExists")
        label = {
            "id": "Label_" + new_id(),
            "name": name,
            "type": "user",
            "labelListVisibility": data.get("labelListVisibility", "labelShow"),
            "messageListVisibility": data.get("messageListVisibility", "show"),
        }
        account.labels[label["id"]] = label
        return ok(label)

    def _list(self, account: Account, query: dict[str, list[str]]) -> SubResponse:
        labels = query.get("labelIds", [])
        spam_trash = first(query, "includeSpamTrash") == "true"
        matcher = search_matcher(first(query, "q") or "")
        limit = min(int(first(query, "maxResults") or 100), 500)
        offset = int(first(query, "pageToken") or 0)
        found = [
            m
            for m in sorted(
                account.messages.values(), key=lambda m: (m.internal_date_ms, m.id), reverse=True
            )
            if all(label in m.label_ids for label in labels)
            and (spam_trash or not {"SPAM", "TRASH"} & set(m.label_ids))
            and matcher(m)
        ]
        page = found[offset : offset + limit]
        body: dict[str, Any] = {"resultSizeEstimate": len(found)}
        if page:
            body["messages"] = [m.ref() for m in page]
        if offset + limit < len(found):
            body["nextPageToken"] = str(offset + limit)
        return ok(body)

    def _render(self, message: StoredMessage, query: dict[str, list[str]]) -> dict[str, Any]:
        fmt = (first(query, "format") or "full").lower()
        body: dict[str, Any] = {
            **message.summary(),
            "snippet": snippet(message.parsed()),
            "historyId": str(message.history_id),
            "internalDate": str(message.internal_date_ms),
            "sizeEstimate": len(message.raw),
        }
        if fmt == "raw":
            body["raw"] = b64url(message.raw)
        elif fmt == "metadata":
            wanted = {h.lower() for h in query.get("metadataHeaders", [])}
            parsed = message.parsed()
            body["payload"] = {
                "mimeType": parsed.get_content_type(),
                "headers": [
                    {"name": k, "value": str(v)}
                    for k, v in parsed.items()
                    if not wanted or k.lower() in wanted
                ],
            }
        elif fmt == "full":
            body["payload"] = payload_of(message.parsed(), message.id, "")
        return body

    def _attachment(self, message: StoredMessage, attachment_id: str) -> SubResponse:
        for index, part in enumerate(message.parsed().walk()):
            if f"{message.id}.{index}" == attachment_id:
                data = part.get_payload(decode=True) or b""
                assert isinstance(data, bytes)
                return ok({"attachmentId": attachment_id, "size": len(data), "data": b64url(data)})
        return error(404, "Requested entity was not found.", "notFound")

    def _modify(self, account: Account, message: StoredMessage, body: bytes) -> SubResponse:
        data = json_body(body)
        add = list(data.get("addLabelIds") or [])
        remove = list(data.get("removeLabelIds") or [])
        for label in add + remove:
            if label not in account.labels:
                raise BadRequest(f"Invalid label: {label}")
        return self._relabel(account, message, add, remove)

    def _batch_modify(self, account: Account, body: bytes) -> SubResponse:
        data = json_body(body)
        ids = list(data.get("ids") or [])
        if not ids or len(ids) > 1000:
            raise BadRequest("ids must name between 1 and 1000 messages")
        add = list(data.get("addLabelIds") or [])
        remove = list(data.get("removeLabelIds") or [])
        for label in add + remove:
            if label not in account.labels:
                raise BadRequest(f"Invalid label: {label}")
        # A message deleted since it was listed must not fail the labelling of the rest.
        for message_id in ids:
            message = account.messages.get(str(message_id))
            if message is not None:
                self._relabel(account, message, add, remove)
        return SubResponse(204, b"")

    def _relabel(
        self, account: Account, message: StoredMessage, add: list[str], remove: list[str]
    ) -> SubResponse:
        added = [label for label in add if label not in message.label_ids]
        removed = [label for label in remove if label in message.label_ids and label not in add]
        message.label_ids = [label for label in message.label_ids if label not in removed] + added
        if added:
            self._record(account, "labelAdded", message, added)
        if removed:
            self._record(account, "labelRemoved", message, removed)
        return ok(message.summary())

    def _delete(self, account: Account, message: StoredMessage) -> SubResponse:
        del account.messages[message.id]
        self._record(account, "messageDeleted", message)
        return SubResponse(204, b"")

    def _upload_body(self, req: SubRequest, upload: bool) -> tuple[dict[str, Any], bytes]:
        """The message metadata and raw RFC 822 bytes of an insert, import or send."""
        if not upload:
            data = json_body(req.body)
            if "raw" not in data:
                raise BadRequest(
                    "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
                )
            return data, unb64url(str(data["raw"]))
        kind = first(req.query, "uploadType") or "media"
        if kind == "media":
            return {}, req.body
        if kind == "multipart":
            boundary = boundary_of(req.headers.get("content-type", ""))
            if boundary is None:
                raise BadRequest("multipart upload without a boundary")
            parts = split_multipart(req.body, boundary)
            if len(parts) != 2:
                raise BadRequest("a multipart upload has a metadata part and a media part")
            return json_body(parts[0].body), parts[1].body
        raise BadRequest(f"Invalid uploadType: {kind}")

    def _insert(
        self, account: Account, req: SubRequest, upload: bool, *, imported: bool
    ) -> SubResponse:
        meta, raw = self._upload_body(req, upload)
        labels = list(meta.get("labelIds") or [])
        source = first(req.query, "internalDateSource") or (
            "dateHeader" if imported else "receivedTime"
        )
        stored = self._store(
            account,
            raw,
            labels,
            requested_thread=meta.get("threadId"),
            date_from_header=source == "dateHeader",
            received=True,
        )
        return ok(stored.summary())

    def _send(self, account: Account, req: SubRequest, upload: bool) -> SubResponse:
        meta, raw = self._upload_body(req, upload)
        if len(raw) > MAX_SEND_BYTES:
            return error(
                413,
                f"Media larger than: {MAX_SEND_BYTES}",
                "uploadTooLarge",
            )
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        recipients = [
            addr.lower()
            for _, addr in email.utils.getaddresses(
                [str(v) for key in ("To", "Cc", "Bcc") for v in parsed.get_all(key, [])]
            )
            if "@" in addr
        ]
        if not recipients:
            raise BadRequest("Recipient address required")
        if len(recipients) > MAX_RECIPIENTS:
            raise BadRequest(
                f"Too many recipients: a message sent through the Gmail API may have at most "
                f"{MAX_RECIPIENTS} To, Cc and Bcc addresses"
            )
        now = time.time()
        account.sent_at = [t for t in account.sent_at if t > now - DAY]
        if len(account.sent_at) >= account.daily_send_limit:
            # Documented: 429 "User-rate limit exceeded" "(Mail sending)" with a time to retry.
            wait = int(account.sent_at[0] + DAY - now) + 1 if account.sent_at else int(DAY)
            return error(
                429,
                "User-rate limit exceeded (Mail sending)",
                "rateLimitExceeded",
                domain="usageLimits",
                **{"Retry-After": str(wait)},
            )
        account.sent_at.append(now)
        # The message goes as it came; only what Gmail fills in when missing is added.
        missing: list[tuple[str, str]] = []
        if not parsed["Date"]:
            missing.append(("Date", email.utils.formatdate(localtime=False, usegmt=True)))
        if not parsed["Message-ID"]:
            missing.append(("Message-ID", email.utils.make_msgid(domain="mail.gmail.com")))
        if not parsed["From"]:
            missing.append(("From", account.email))
        raw = prepend_headers(raw, missing)
        labels = ["SENT"] + (["INBOX", "UNREAD"] if account.addresses() & set(recipients) else [])
        sent = self._store(account, raw, labels, requested_thread=meta.get("threadId"))
        # Recipients never see Bcc.
        delivered = strip_header(raw, "Bcc")
        for address in dict.fromkeys(recipients):
            other = self.account(address)
            if other is not None and other is not account:
                self._store(other, delivered, ["INBOX", "UNREAD"], received=True)
            elif other is None and self.external_delivery is not None:
                self.external_delivery(address, delivered)
        return ok(sent.summary())

    # ------------------------------------------------------------------ storage
    def _store(
        self,
        account: Account,
        raw: bytes,
        labels: list[str],
        *,
        requested_thread: str | None = None,
        date_from_header: bool = False,
        received: bool = False,
    ) -> StoredMessage:
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        for label in labels:
            if label not in account.labels:
                raise BadRequest(f"Invalid label: {label}")
        internal = int(time.time() * 1000)
        if date_from_header and parsed["Date"]:
            with contextlib.suppress(TypeError, ValueError):
                internal = int(
                    email.utils.parsedate_to_datetime(str(parsed["Date"])).timestamp() * 1000
                )
        message_id = new_id()
        subject = normalize_subject(str(parsed["Subject"] or ""))
        account.history_id += 1
        stored = StoredMessage(
            id=message_id,
            thread_id=self._thread_for(account, parsed, subject, requested_thread, received)
            or message_id,
            label_ids=list(dict.fromkeys(labels)),
            raw=raw,
            internal_date_ms=internal,
            history_id=account.history_id,
            header_message_id=next(iter(message_ids(str(parsed["Message-ID"] or ""))), None),
            subject=subject,
        )
        account.messages[message_id] = stored
        self._record(account, "messageAdded", stored, bump=False)
        return stored

    def _thread_for(
        self,
        account: Account,
        parsed: Message,
        subject: str,
        requested: str | None,
        received: bool,
    ) -> str | None:
        """Gmail's rule: a reply joins a thread only if it references one of its messages
        and the subject matches; a requested threadId is honoured under the same rule."""
        refs = set(
            message_ids(str(parsed["In-Reply-To"] or ""))
            + message_ids(str(parsed["References"] or ""))
        )
        if not refs:
            return None
        candidates = [
            m
            for m in account.messages.values()
            if m.header_message_id in refs and m.subject == subject
        ]
        if requested:
            return requested if any(m.thread_id == requested for m in candidates) else None
        if received or candidates:
            return candidates[0].thread_id if candidates else None
        return None

    def _record(
        self,
        account: Account,
        kind: str,
        message: StoredMessage,
        label_ids: list[str] | None = None,
        *,
        bump: bool = True,
    ) -> None:
        if bump:
            account.history_id += 1
        account.history.append(
            HistoryRecord(account.history_id, kind, message.summary(), label_ids or [])
        )
        watch = account.watch
        if watch is None or watch.expiration_ms < time.time() * 1000:
            return
        if watch.wants(message.label_ids + (label_ids or [])):
            self._schedule_push(account)

    # ------------------------------------------------------------------ push
    def _schedule_push(self, account: Account) -> None:
        """Gmail's push guide: "Each Gmail user being watched has a maximum notification rate
        of 1 event/sec. Any user notifications above that rate will be dropped." A change
        within `push_min_interval` of the last notification sends none (`merge_pushes`:
        it rides on a later one instead, the older, kinder behaviour)."""
        if self.push_sink is None:
            return
        if account.push_pending:
            return  # the notification on its way carries the newest history id
        if not self.merge_pushes and time.monotonic() - account.last_push < self.push_min_interval:
            account.pushes_dropped += 1
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        account.push_pending = True
        if not self.merge_pushes:
            account.last_push = time.monotonic()
        task = loop.create_task(self._push(account))
        self._push_tasks.add(task)
        task.add_done_callback(self._push_tasks.discard)

    async def drain_pushes(self) -> None:
        """Wait for the notifications already scheduled to be delivered."""
        while self._push_tasks:
            await asyncio.gather(*list(self._push_tasks), return_exceptions=True)

    async def _push(self, account: Account) -> None:
        if self.merge_pushes:
            wait = account.last_push + self.push_min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        with self._lock:
            account.push_pending = False
            if self.merge_pushes:
                account.last_push = time.monotonic()
            watch = account.watch
            if watch is None:
                return
            endpoint = self.push_endpoints.get(watch.topic) or self.push_endpoints.get("*")
            if endpoint is None:
                return
            envelope = push_envelope(watch.topic, account.email, account.history_id)
            self.pushes_sent += 1
        sink = self.push_sink
        if sink is not None:
            result = sink(endpoint, envelope)
            if asyncio.iscoroutine(result):
                await result


class BadRequest(Exception):
    pass


def first(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    return values[0] if values else None


def json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest("Invalid JSON payload received.") from None
    if not isinstance(data, dict):
        raise BadRequest("Invalid JSON payload received.")
    return data


def push_envelope(topic: str, address: str, history_id: int) -> dict[str, Any]:
    published = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    message_id = str(secrets.randbelow(10**16))
    data = json.dumps({"emailAddress": address, "historyId": history_id}).encode()
    subscription = topic.replace("/topics/", "/subscriptions/") + "-push"
    return {
        "message": {
            "data": b64url(data),
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": published,
            "publish_time": published,
        },
        "subscription": subscription,
    }


def snippet(parsed: Message) -> str:
    for part in parsed.walk():
        if part.get_content_type() == "text/plain" and not part.get_filename():
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                text = data.decode(part.get_content_charset() or "utf-8", "replace")
                return " ".join(text.split())[:200]
    return ""


def payload_of(
    part: Message, message_id: str, part_id: str, counter: list[int] | None = None
) -> dict[str, Any]:
    counter = counter if counter is not None else [0]
    index = counter[0]
    counter[0] += 1
    payload: dict[str, Any] = {
        "partId": part_id,
        "mimeType": part.get_content_type(),
        "filename": part.get_filename() or "",
        "headers": [{"name": k, "value": str(v)} for k, v in part.items()],
    }
    if part.is_multipart():
        children = part.get_payload()
        assert isinstance(children, list)
        payload["body"] = {"size": 0}
        payload["parts"] = [
            payload_of(child, message_id, f"{part_id}.{n}" if part_id else str(n), counter)
            for n, child in enumerate(children)
        ]
        return payload
    data = part.get_payload(decode=True)
    data = data if isinstance(data, bytes) else b""
    if payload["filename"]:
        payload["body"] = {"size": len(data), "attachmentId": f"{message_id}.{index}"}
    else:
        payload["body"] = {"size": len(data), "data": b64url(data)}
    return payload


_DATE = re.compile(r"^(\d{4})/(\d{1,2})/(\d{1,2})$")


def search_matcher(query: str) -> Callable[[StoredMessage], bool]:
    """The part of Gmail's search syntax mailsync needs: after:/before:, in:, label:, from:,
    to:, rfc822msgid:."""
    tests: list[Callable[[StoredMessage], bool]] = []
    for term in query.split():
        key, sep, value = term.partition(":")
        if sep:
            tests.append(_search_term(key.lower(), value.lower()))
    return lambda m: all(test(m) for test in tests)


def _search_term(key: str, value: str) -> Callable[[StoredMessage], bool]:
    if key in ("after", "before"):
        match = _DATE.match(value)
        moment = (
            datetime(int(match[1]), int(match[2]), int(match[3]), tzinfo=UTC).timestamp()
            if match
            else float(value)
        )
        ms = int(moment * 1000)

        def dated(m: StoredMessage) -> bool:
            return m.internal_date_ms >= ms if key == "after" else m.internal_date_ms < ms

        return dated
    if key in ("in", "label"):
        return lambda m: value.upper() in m.label_ids
    if key == "rfc822msgid":
        # Gmail's operator for the Message-ID header; written without angle brackets.
        wanted = value.strip().removeprefix("<").removesuffix(">")
        return lambda m: (m.header_message_id or "").lower().strip("<>") == wanted
    if key in ("from", "to"):
        header = "From" if key == "from" else "To"
        return lambda m: value in str(m.parsed()[header] or "").lower()
    return lambda m: True


def consent_page(query: dict[str, str]) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in query.items()
        if k not in ("login_hint", "decision")
    )
    scopes = "".join(f"<li>{html.escape(s)}</li>" for s in query.get("scope", "").split())
    return (
        "<!doctype html><title>Sign in - Google Accounts (sandbox)</title>"
        "<h1>Choose an account</h1><p>mailsync wants to:</p><ul>" + scopes + "</ul>"
        '<form method="get" action="/o/oauth2/v2/auth">' + hidden + '<input name="login_hint" '
        'type="email" placeholder="you@example.com" required> '
        '<button name="decision" value="allow">Allow</button> '
        '<button name="decision" value="deny" formnovalidate>Cancel</button></form>'
    )
