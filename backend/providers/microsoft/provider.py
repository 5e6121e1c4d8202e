"""Outlook behind the MailProvider interface: per-folder delta links as the cursor, a Graph
subscription for push, MIME through `/$value`, sending through sendMail or createReply."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import functools
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
from kiota_abstractions.api_error import APIError
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_abstractions.method import Method
from kiota_abstractions.request_information import RequestInformation
from kiota_abstractions.serialization import ParsableFactory
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.subscription import Subscription

from backend.providers.base import (
    AccessDenied,
    ChangeSet,
    CursorInvalid,
    FetchedMessage,
    MailboxAccount,
    MailboxNotFound,
    MailProvider,
    MessageRef,
    PermanentProviderError,
    ProviderError,
    RateLimited,
    SendLimits,
    SendRejected,
    SendRejection,
    SentMessage,
    SyncErrorCode,
    TransientProviderError,
    bare_message_id,
)
from backend.providers.microsoft.client import build_graph_client
from backend.providers.microsoft.tokens import EARLY, TokenKeeper
from backend.providers.pacing import Backoff, mailbox_backoff, mailbox_semaphore
from backend.settings import Settings

T = TypeVar("T")
SYNCED_FOLDERS = ("inbox", "sentitems")
PAGE = 100
# Graph's Outlook service limits, per app and mailbox: 4 concurrent requests
# (MailboxConcurrency), 10,000 requests per 10 minutes (learn.microsoft.com/graph/
# throttling-limits#outlook-service-limits). The 4 hold per mailbox across the process.
CONCURRENCY = 4
INLINE_RETRIES = 2
RESYNC_CODES = {"syncStateNotFound", "resyncRequired", "SyncStateNotFound"}
DELTA_PREFER = 'odata.maxpagesize=100, IdType="ImmutableId"'
IMMUTABLE = 'IdType="ImmutableId"'
# Graph refuses a request over 4 MB with 413 (learn.microsoft.com/graph/api/user-post-messages;
# the same limit applies to sendMail and createReply). The MIME goes base64-encoded, a third
# larger, so 3,000,000 bytes of MIME stay under 4,000,000 (and 4 MiB) of request. 500
# recipients per message is Exchange Online's default recipient limit (Exchange Online limits).
GRAPH_SEND_LIMITS = SendLimits(max_recipients=500, max_bytes=3_000_000)
TOO_LARGE_CODES = {"ErrorMessageSizeExceeded", "RequestEntityTooLarge", "ErrorRequestSizeExceeded"}


def client_state(settings: Settings, mailbox_id: str) -> str:
    """`<mailbox id>.<mac>`: names the mailbox a notification is for and proves it is ours."""
    mac = hmac.new(settings.secret, f"graph:{mailbox_id}".encode(), hashlib.sha256).hexdigest()
    return f"{mailbox_id}.{mac[:64]}"


def mailbox_of_client_state(settings: Settings, value: str | None) -> str | None:
    mailbox_id, _, _ = (value or "").partition(".")
    if mailbox_id and hmac.compare_digest(value or "", client_state(settings, mailbox_id)):
        return mailbox_id
    return None


def _config(prefer: str | None = None) -> RequestConfiguration[Any]:
    config: RequestConfiguration[Any] = RequestConfiguration()
    if prefer:
        config.headers.add("Prefer", prefer)
    return config


def _retry_after(error: APIError) -> float | None:
    headers = getattr(error, "response_headers", None) or {}
    for name, value in dict(headers).items():
        if str(name).lower() != "retry-after":
            continue
        # kiota hands header values over as a set or list of strings.
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        try:
            return float(values[0]) if values else None
        except (TypeError, ValueError):
            return None
    return None


class ItemNotFound(ProviderError):
    """A 404 on one item (a message deleted meanwhile, a subscription Graph dropped)."""


def translate(error: APIError, *, what: str) -> ProviderError:
    """Graph's answer in terms of the R13 codes."""
    status = int(getattr(error, "response_status_code", 0) or 0)
    code = ""
    if isinstance(error, ODataError) and error.error is not None:
        code = str(error.error.code or "")
        detail = f"{what}: HTTP {status} {code} {error.error.message or ''}".strip()
    else:
        detail = f"{what}: HTTP {status} {error}".strip()
    if status == 410 or code in RESYNC_CODES:
        return CursorInvalid(detail, SyncErrorCode.READ_FAILED)
    if status == 429:
        return RateLimited(detail, retry_after=_retry_after(error))
    if code == "MailboxNotEnabledForRESTAPI" or (code == "ResourceNotFound" and "User" in detail):
        return MailboxNotFound(detail)
    if status in (401, 403):
        return AccessDenied(detail)
    if status == 404:
        return ItemNotFound(detail, SyncErrorCode.READ_FAILED)
    if status >= 500 or status == 408:
        return TransientProviderError(detail, retry_after=_retry_after(error))
    return ProviderError(detail, SyncErrorCode.READ_FAILED)


def send_failure(error: APIError, *, what: str) -> ProviderError:
    """Graph's refusal of a send, as a `SendRejected` when it is about the message."""
    status = int(getattr(error, "response_status_code", 0) or 0)
    code, message = "", ""
    if isinstance(error, ODataError) and error.error is not None:
        code, message = str(error.error.code or ""), str(error.error.message or "")
    detail = f"{what}: HTTP {status} {code} {message}".strip()
    if status == 413 or code in TOO_LARGE_CODES:
        return SendRejected(detail, SendRejection.TOO_LARGE)
    if code == "ErrorInvalidRecipients":
        return SendRejected(detail, SendRejection.RECIPIENT_REJECTED)
    if status == 400:
        lowered = message.lower()
        if "recipient" in lowered and any(w in lowered for w in ("too many", "maximum", "limit")):
            return SendRejected(detail, SendRejection.TOO_MANY_RECIPIENTS)
        if "recipient" in lowered:
            return SendRejected(detail, SendRejection.RECIPIENT_REJECTED)
        return SendRejected(detail, SendRejection.OTHER)
    translated = translate(error, what=what)
    if isinstance(translated, (TransientProviderError, PermanentProviderError)):
        return translated
    return PermanentProviderError(translated.detail, SyncErrorCode.SEND_FAILED)


class MicrosoftProvider(MailProvider):
    send_limits = GRAPH_SEND_LIMITS

    def __init__(
        self, mailbox: MailboxAccount, credentials: dict[str, Any], settings: Settings
    ) -> None:
        self.settings = settings
        self.mailbox_id = str(mailbox.id) if mailbox.id else ""
        self.address = mailbox.email_address
        self.tokens = TokenKeeper(
            settings,
            credentials,
            on_rotate=self._store_credentials,
            mailbox_id=self.mailbox_id or None,
            load=self._load_credentials,
        )
        self.graph, self._http = build_graph_client(
            settings.microsoft.graph_url, self.tokens.current, retries=False
        )
        self.inline_wait = settings.provider_inline_wait_seconds
        # What delta told us of each message: conversation, folder, received time.
        self._seen: dict[str, tuple[str | None, str, datetime | None]] = {}
        self._limit_key = self.mailbox_id or f"unshared:{id(self)}"

    @property
    def _limit(self) -> asyncio.Semaphore:
        """MailboxConcurrency, shared by every provider of this mailbox in the process (a
        pass, a send job, the disconnect's release)."""
        return mailbox_semaphore(self._limit_key, CONCURRENCY)

    @property
    def pace(self) -> Backoff:
        """The mailbox's backoff after 429s, shared like the concurrency limit."""
        return mailbox_backoff("graph", self._limit_key)

    async def close(self) -> None:
        await self._http.aclose()

    def updated_credentials(self) -> dict[str, Any] | None:
        return self.tokens.updated()

    async def _store_credentials(self, credentials: dict[str, Any]) -> None:
        if self.credential_store is not None:
            await self.credential_store.save(credentials)

    async def _load_credentials(self) -> dict[str, Any] | None:
        if self.credential_store is None:
            return None
        return await self.credential_store.load()

    async def prepare(self, seconds: float) -> None:
        await self.tokens.ensure_fresh(timedelta(seconds=seconds) + EARLY)

    async def call(
        self,
        make: Callable[[], Awaitable[T]],
        *,
        what: str,
        retries: int = INLINE_RETRIES,
        translator: Callable[..., ProviderError] = translate,
    ) -> T:
        """One Graph call: a fresh token first, one refresh on 401, 429s and blips waited out.

        At most CONCURRENCY calls per mailbox run at once in the process; a 429 rests every
        caller of the mailbox for its Retry-After (or the shared backoff without one), and
        the call is made again until the waits reach their cap. A Retry-After longer than
        the inline wait ends the pass instead (retried then, its progress kept).

        `retries=0` for calls that must not be repeated blindly (a send Graph may have
        accepted before its answer was lost); a 401 is still retried once after a refresh,
        and a 429 too, since Graph did nothing with the request."""
        refreshed = False
        attempt = 0
        while True:
            await self.tokens.ensure_fresh()
            await self.pace.wait()
            token = self.tokens.current()
            try:
                async with self._limit:
                    result = await make()
            except APIError as exc:
                error = translator(exc, what=what)
                status = int(getattr(exc, "response_status_code", 0) or 0)
                if status == 401 and not refreshed:
                    refreshed = True
                    await self.tokens.refresh(stale=token)
                    continue
            except httpx.HTTPError as exc:
                error = TransientProviderError(f"{what}: {exc!r}")
            else:
                if self.pace.failures:
                    self.pace.succeeded()
                return result
            if isinstance(error, RateLimited) and (
                error.retry_after is None or error.retry_after <= self.inline_wait
            ):
                self.pace.rate_limited(error.retry_after)
                if self.pace.exhausted:
                    raise RateLimited(
                        f"{error.detail} (still throttled after {self.pace.failures} waits)",
                        retry_after=self.pace.next_delay(),
                    ) from error
                continue
            if not isinstance(error, TransientProviderError) or attempt >= retries:
                raise error
            wait = error.retry_after if error.retry_after is not None else 0.5 * (attempt + 1)
            if wait > self.inline_wait:
                raise error
            await asyncio.sleep(wait)
            attempt += 1

    async def me(self) -> Any:
        return await self.call(self.graph.me.get, what="me")

    async def own_addresses(self) -> list[str]:
        me = await self.me()
        found = [str(me.mail or ""), str(me.user_principal_name or "")]
        found += [
            p.split(":", 1)[1] for p in me.proxy_addresses or [] if p.lower().startswith("smtp:")
        ]
        addresses = list(dict.fromkeys(a.lower() for a in found if "@" in a))
        return addresses or [self.address]

    async def list_changes(self, cursor: dict[str, Any] | None, since: datetime) -> ChangeSet:
        links = dict((cursor or {}).get("delta") or {})
        refs: dict[str, MessageRef] = {}
        received: dict[str, datetime] = {}
        new_links: dict[str, str] = {}
        full = not links
        for folder in SYNCED_FOLDERS:
            new_links[folder] = await self._delta(folder, links.get(folder), since, refs, received)
        epoch = datetime.min.replace(tzinfo=UTC)
        ordered = sorted(
            refs.values(), key=lambda r: (received.get(r.provider_id, epoch), r.provider_id)
        )
        return ChangeSet(refs=ordered, cursor={"delta": new_links}, full_resync=full)

    async def _delta(
        self,
        folder: str,
        link: str | None,
        since: datetime,
        refs: dict[str, MessageRef],
        received: dict[str, datetime],
    ) -> str:
        builder = self.graph.me.mail_folders.by_mail_folder_id(folder).messages.delta
        url = link
        while True:
            page = await self.call(
                functools.partial(self._delta_page, builder, url, since), what=f"delta {folder}"
            )
            if page is None:
                raise TransientProviderError(f"delta {folder}: empty answer")
            for message in page.value or []:
                extra = message.additional_data or {}
                if "@removed" in extra or not message.id or message.is_draft:
                    continue
                refs.setdefault(message.id, MessageRef(message.id, message.conversation_id))
                when = message.received_date_time
                if when is not None:
                    received[message.id] = when
                self._seen[message.id] = (message.conversation_id, folder, when)
            if page.odata_next_link:
                url = page.odata_next_link
                continue
            if not page.odata_delta_link:
                raise TransientProviderError(f"delta {folder}: no nextLink or deltaLink")
            return str(page.odata_delta_link)

    @staticmethod
    async def _delta_page(builder: Any, url: str | None, since: datetime) -> Any:
        if url is not None:
            return await builder.with_url(url).get(_config(DELTA_PREFER))
        stamp = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = _config(DELTA_PREFER)
        config.query_parameters = builder.DeltaRequestBuilderGetQueryParameters(
            filter=f"receivedDateTime ge {stamp}",
            select=["id", "conversationId", "receivedDateTime", "isDraft", "parentFolderId"],
        )
        return await builder.get(config)

    async def fetch(self, refs: Sequence[MessageRef]) -> list[FetchedMessage | ProviderError]:
        async def one(ref: MessageRef) -> FetchedMessage | ProviderError:
            content = self.graph.me.messages.by_message_id(ref.provider_id).content
            try:
                raw = await self.call(content.get, what=f"message {ref.provider_id}")
            except ItemNotFound:
                return PermanentProviderError(
                    f"message {ref.provider_id} was deleted before it could be read"
                )
            except (PermanentProviderError, TransientProviderError):
                raise  # the mailbox's trouble, not this message's
            except ProviderError as exc:
                return exc
            conversation, folder, when = self._seen.get(ref.provider_id, (ref.thread_id, "", None))
            return FetchedMessage(
                ref=ref,
                raw=raw or b"",
                thread_id=conversation or ref.thread_id,
                labels=[folder] if folder else [],
                internal_date=when,
            )

        return list(await asyncio.gather(*(one(ref) for ref in refs)))

    async def send(self, raw: bytes, thread_id: str | None = None) -> SentMessage:
        """The MIME itself goes to Graph (base64, `Content-Type: text/plain`), so every header
        (Message-ID, In-Reply-To, References, custom ones) and every attachment survives.

        A reply to a message the mailbox holds goes through `createReply` with the MIME (Graph
        accepts MIME there too) and then `send`: Outlook files it in the original's
        conversation, and the draft, asked for with an ImmutableId, keeps its id in Sent Items,
        where delta sees it. Other mail goes through `sendMail`, which answers 202 without an
        id; the Sent copy is then looked up by Message-ID, and when Graph has not filed it
        yet the answer names no id (it arrives through delta)."""
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        in_reply_to = next(iter(_message_ids(str(headers.get("In-Reply-To", "")))), "")
        original = await self._original(in_reply_to) if in_reply_to else None
        if original is not None:
            reply = self.graph.me.messages.by_message_id(original).create_reply
            draft = await self.call(
                lambda: self._post_mime(reply, raw, Message),
                what="createReply",
                translator=send_failure,
            )
            if draft is None or not draft.id:
                raise PermanentProviderError(
                    "createReply returned no draft", SyncErrorCode.SEND_FAILED
                )
            draft_id = str(draft.id)
            await self.call(
                self.graph.me.messages.by_message_id(draft_id).send.post,
                what="send reply",
                retries=0,
                translator=send_failure,
            )
            return SentMessage(draft_id, draft.conversation_id or thread_id)
        await self.call(
            lambda: self._post_mime(self.graph.me.send_mail, raw, None),
            what="sendMail",
            retries=0,
            translator=send_failure,
        )
        message_id = str(headers.get("Message-ID", "") or "")
        if message_id.strip():
            try:
                found = await self.find_sent(message_id)
            except ProviderError:
                found = None  # sent all the same: the Sent copy arrives through delta
            if found is not None:
                return SentMessage(found.provider_id, found.thread_id or thread_id)
        return SentMessage("", thread_id)

    async def _post_mime(
        self, builder: Any, raw: bytes, parsable: ParsableFactory[Any] | None
    ) -> Any:
        """POST the MIME to a builder's URL on the SDK's own adapter (auth, middleware):
        the SDK only writes JSON bodies, Graph wants the MIME base64-encoded as text/plain."""
        info = RequestInformation(Method.POST, builder.url_template, builder.path_parameters)
        info.configure(_config(IMMUTABLE))
        info.headers.try_add("Accept", "application/json")
        info.set_stream_content(base64.b64encode(raw), "text/plain")
        errors: dict[str, Any] = {"XXX": ODataError}
        adapter = builder.request_adapter
        if parsable is None:
            await adapter.send_no_response_content_async(info, errors)
            return None
        return await adapter.send_async(info, parsable, errors)

    async def find_sent(self, message_id: str) -> SentMessage | None:
        """`GET /me/messages?$filter=internetMessageId eq '<id>'` (every folder), ids asked
        for as ImmutableIds; drafts are skipped (a reply draft carries the Message-ID before
        it is sent), and of several copies (mail to oneself) the Sent Items one wins."""
        bare = bare_message_id(message_id)
        if not bare:
            return None
        builder = self.graph.me.messages
        config = _config(IMMUTABLE)
        escaped = f"<{bare}>".replace("'", "''")
        config.query_parameters = builder.MessagesRequestBuilderGetQueryParameters(
            filter=f"internetMessageId eq '{escaped}'",
            select=["id", "conversationId", "isDraft", "parentFolderId"],
            top=10,
        )
        page = await self.call(lambda: builder.get(config), what="find sent")
        found = [m for m in (page.value if page else None) or [] if m.id and not m.is_draft]
        if not found:
            return None
        chosen = found[0]
        if len(found) > 1:
            sent = await self.call(
                self.graph.me.mail_folders.by_mail_folder_id("sentitems").get,
                what="sentitems folder",
            )
            chosen = next((m for m in found if sent and m.parent_folder_id == sent.id), chosen)
        return SentMessage(str(chosen.id), chosen.conversation_id)

    async def _original(self, in_reply_to: str) -> str | None:
        """The mailbox's message a reply answers (drafts aside), by its Message-ID."""
        config = _config(IMMUTABLE)
        builder = self.graph.me.messages
        escaped = in_reply_to.replace("'", "''")
        config.query_parameters = builder.MessagesRequestBuilderGetQueryParameters(
            filter=f"internetMessageId eq '{escaped}'", select=["id", "isDraft"], top=10
        )
        found = await self.call(lambda: builder.get(config), what="find original")
        for message in (found.value if found else None) or []:
            if message.id and not message.is_draft:
                return str(message.id)
        return None

    async def mark(self, provider_ids: Sequence[str], label: str) -> None:
        async def one(provider_id: str) -> None:
            item = self.graph.me.messages.by_message_id(provider_id)
            config = _config()
            config.query_parameters = item.MessageItemRequestBuilderGetQueryParameters(
                select=["categories"]
            )
            current = await self.call(lambda: item.get(config), what="categories")
            categories = list((current.categories if current else None) or [])
            if label not in categories:
                await self.call(
                    lambda: item.patch(Message(categories=[*categories, label])),
                    what="set category",
                )

        await asyncio.gather(*(one(p) for p in provider_ids))

    async def subscribe(self) -> datetime | None:
        expires = datetime.now(UTC) + timedelta(
            minutes=self.settings.microsoft_subscription_minutes
        )
        existing = self.tokens.credentials.get("subscription_id")
        if existing:
            try:
                await self.call(
                    lambda: self.graph.subscriptions.by_subscription_id(existing).patch(
                        Subscription(expiration_date_time=expires)
                    ),
                    what="renew subscription",
                )
                return expires
            except ItemNotFound:
                pass  # Graph dropped it: create a new one
        hook = f"{self.settings.public_url.rstrip('/')}/webhooks/microsoft"
        created = await self.call(
            lambda: self.graph.subscriptions.post(
                Subscription(
                    change_type="created",
                    notification_url=hook,
                    lifecycle_notification_url=hook,
                    resource="me/messages",
                    expiration_date_time=expires,
                    client_state=client_state(self.settings, self.mailbox_id),
                )
            ),
            what="create subscription",
        )
        if created is None or not created.id:
            return None
        self.tokens.remember("subscription_id", str(created.id))
        return expires

    async def unsubscribe(self) -> None:
        existing = self.tokens.credentials.get("subscription_id")
        if not existing:
            return
        with contextlib.suppress(ItemNotFound):  # already gone
            await self.call(
                self.graph.subscriptions.by_subscription_id(existing).delete,
                what="delete subscription",
            )
        self.tokens.remember("subscription_id", None)


def _message_ids(value: str) -> list[str]:
    """The `<...>` ids in a header such as In-Reply-To or References."""
    out, rest = [], value
    while "<" in rest and ">" in rest:
        start = rest.index("<")
        end = rest.find(">", start)
        if end < 0:
            break
        out.append(rest[start : end + 1])
        rest = rest[end + 1 :]
    return out
