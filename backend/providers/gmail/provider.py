"""Gmail behind the MailProvider interface: history ids as the cursor, watch for push."""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from googleapiclient.errors import HttpError, MediaUploadSizeError
from googleapiclient.http import MediaIoBaseUpload

from backend.providers.base import (
    AccessDenied,
    ChangeSet,
    CursorInvalid,
    FetchedMessage,
    MailboxAccount,
    MailProvider,
    MessageRef,
    PermanentProviderError,
    ProviderConfigurationError,
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
from backend.providers.gmail.client import (
    GmailClient,
    give_up,
    send_failure,
    translate,
    unb64url,
)
from backend.settings import Settings

log = logging.getLogger(__name__)

SYNCED_LABELS = ("INBOX", "SENT")
SKIPPED_LABELS = {"DRAFT", "SPAM", "TRASH"}
PAGE = 500
# Rounds a message refused for another transient reason (5xx, no answer) is asked for.
FETCH_ROUNDS = 3
BATCH_MODIFY_LIMIT = 1000
# Gmail API `messages.send`: uploads up to 35 MB (the discovery document's `maxSize`,
# 36,700,160 bytes); at most 100 To/Cc/Bcc recipients for mail sent through the Gmail API
# ("Gmail sending limits in Google Workspace", support.google.com/a/answer/166852).
GMAIL_SEND_LIMITS = SendLimits(max_recipients=100, max_bytes=36_700_160)


def _message_order(message_id: str) -> tuple[int, str]:
    # Gmail ids grow with time; oldest first lets a reply find the message it answers.
    try:
        return int(message_id, 16), message_id
    except ValueError:
        return 0, message_id


def _syncable(labels: Sequence[str]) -> bool:
    found = set(labels)
    return bool(found & set(SYNCED_LABELS)) and not found & SKIPPED_LABELS


class GmailProvider(MailProvider):
    send_limits = GMAIL_SEND_LIMITS

    def __init__(
        self, mailbox: MailboxAccount, credentials: dict[str, Any], settings: Settings
    ) -> None:
        self.client = GmailClient(settings, credentials, mailbox.id or None)
        self.settings = settings
        self.address = mailbox.email_address
        self._label_ids: dict[str, str] = {}
        # The labels each message had when this pass fetched it.
        self._labels_of: dict[str, list[str]] = {}

    def _messages_list(self, params: dict[str, Any]) -> Any:
        return self.client.users.messages().list(**params)

    def _history_list(self, params: dict[str, Any]) -> Any:
        return self.client.users.history().list(**params)

    async def profile(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.execute(
            lambda: self.client.users.getProfile(userId="me"), what="getProfile"
        )
        return result

    async def own_addresses(self) -> list[str]:
        result = await self.client.execute(
            lambda: self.client.users.settings().sendAs().list(userId="me"), what="sendAs.list"
        )
        addresses = [str(e["sendAsEmail"]).lower() for e in result.get("sendAs", [])]
        return addresses or [self.address]

    async def list_changes(self, cursor: dict[str, Any] | None, since: datetime) -> ChangeSet:
        if cursor and cursor.get("historyId"):
            return await self._history_since(str(cursor["historyId"]))
        # Take the position first: whatever arrives while listing is caught by the next pass.
        history_id = str((await self.profile())["historyId"])
        refs: dict[str, MessageRef] = {}
        for label in SYNCED_LABELS:
            page_token: str | None = None
            while True:
                params: dict[str, Any] = {
                    "userId": "me",
                    "labelIds": [label],
                    "q": f"after:{int(since.timestamp())}",
                    "maxResults": PAGE,
                }
                if page_token:
                    params["pageToken"] = page_token
                result = await self.client.execute(
                    functools.partial(self._messages_list, params), what="messages.list"
                )
                for item in result.get("messages", []):
                    refs.setdefault(item["id"], MessageRef(item["id"], item.get("threadId")))
                page_token = result.get("nextPageToken")
                if not page_token:
                    break
        ordered = sorted(refs.values(), key=lambda r: _message_order(r.provider_id))
        return ChangeSet(refs=ordered, cursor={"historyId": history_id}, full_resync=True)

    async def _history_since(self, start: str) -> ChangeSet:
        refs: dict[str, MessageRef] = {}
        unlabelled: dict[str, MessageRef] = {}
        page_token: str | None = None
        latest = start
        while True:
            # Paged by hand: list_next() chokes on the repeated historyTypes parameter.
            params: dict[str, Any] = {
                "userId": "me",
                "startHistoryId": start,
                "historyTypes": ["messageAdded", "labelAdded"],
                "maxResults": PAGE,
            }
            if page_token:
                params["pageToken"] = page_token
            try:
                result = await self.client.execute(
                    functools.partial(self._history_list, params), what="history.list"
                )
            except ProviderError as exc:
                if "HTTP 404" in exc.detail:
                    raise CursorInvalid(exc.detail, SyncErrorCode.READ_FAILED) from exc
                raise
            for record in result.get("history", []):
                entries = [
                    *record.get("messagesAdded", []),
                    # A label added is new mail only when it puts the message in INBOX or
                    # SENT: our own CRM label (or any other) is no reason to read it again.
                    *(
                        entry
                        for entry in record.get("labelsAdded", [])
                        if entry.get("labelIds") is None
                        or set(entry["labelIds"]) & set(SYNCED_LABELS)
                    ),
                ]
                for added in entries:
                    message = added["message"]
                    ref = MessageRef(message["id"], message.get("threadId"))
                    if "labelIds" not in message:
                        # Gmail may leave the labels out: look the message up, never drop it.
                        unlabelled.setdefault(ref.provider_id, ref)
                        refs.setdefault(ref.provider_id, ref)
                    elif _syncable(message["labelIds"]):
                        refs.setdefault(ref.provider_id, ref)
            latest = str(result.get("historyId", latest))
            page_token = result.get("nextPageToken")
            if not page_token:
                break
        for message_id in await self._unsyncable(list(unlabelled)):
            refs.pop(message_id, None)
        return ChangeSet(refs=list(refs.values()), cursor={"historyId": latest})

    async def _unsyncable(self, ids: list[str]) -> set[str]:
        """Of messages named without labels, those not in INBOX/SENT (or gone): one
        `messages.get` (format=metadata) each, batched and paced like `fetch`."""
        skip: set[str] = set()
        results = await self._batched(ids, format="metadata", fields="id,labelIds")
        for message_id, result in results.items():
            if isinstance(result, dict):
                if not _syncable(result.get("labelIds", [])):
                    skip.add(message_id)
            elif isinstance(result, HttpError) and result.status_code == 404:
                skip.add(message_id)  # deleted since: nothing to file
            # Any other failure: keep it; fetching it will tell.
        return skip

    async def _batched(
        self, ids: list[str], **params: Any
    ) -> dict[str, dict[str, Any] | HttpError]:
        """`messages.get` for every id, in batches sized and paced by the mailbox's backoff.

        Calls refused for quota (429 or 403 `userRateLimitExceeded` inside the batch) are asked
        for again after the shared backoff, the batch halved; a clean batch lets it grow back.
        Other transient failures are asked for again up to FETCH_ROUNDS times. Gives up
        (RateLimited) only when the waits reach their cap or Gmail names a long Retry-After."""
        pace = self.client.pace
        results: dict[str, dict[str, Any] | HttpError] = {}
        rounds: dict[str, int] = {}
        pending = list(ids)
        while pending:
            await pace.wait()
            chunk, pending = pending[: pace.batch_size], pending[pace.batch_size :]
            try:
                answers = await self.client.batch_get(chunk, **params)
            except RateLimited as exc:  # the whole batch refused
                if not self.client.short_wait(exc):
                    raise
                pace.rate_limited(exc.retry_after)
                if pace.exhausted:
                    raise give_up(exc, pace) from exc
                pending = chunk + pending
                continue
            limited: list[str] = []
            again: list[str] = []
            longest: float | None = None
            for message_id in chunk:
                answer = answers.get(message_id)
                error = (
                    translate(answer, what=f"messages.get {message_id}")
                    if isinstance(answer, HttpError)
                    else None
                    if answer is not None
                    else TransientProviderError(f"messages.get {message_id}: no answer")
                )
                if isinstance(error, RateLimited):
                    if not self.client.short_wait(error):
                        raise error
                    limited.append(message_id)
                    if error.retry_after is not None:
                        longest = max(longest or 0.0, error.retry_after)
                    continue
                if isinstance(error, TransientProviderError):
                    rounds[message_id] = rounds.get(message_id, 0) + 1
                    if rounds[message_id] < FETCH_ROUNDS:
                        again.append(message_id)
                        continue
                    # The pass fails and its next attempt asks for these again.
                    raise TransientProviderError(
                        f"message {message_id} could not be read yet: {error.detail}",
                        retry_after=error.retry_after,
                    )
                assert answer is not None
                results[message_id] = answer
            if limited:
                pace.rate_limited(longest)
                if pace.exhausted:
                    raise give_up(RateLimited(f"{len(limited)} messages refused for quota"), pace)
            else:
                pace.succeeded()
            if again:
                await asyncio.sleep(0.5 * max(rounds[i] for i in again))
            pending = limited + again + pending
        return results

    async def fetch(self, refs: Sequence[MessageRef]) -> list[FetchedMessage | ProviderError]:
        found: dict[str, FetchedMessage | ProviderError] = {}
        results = await self._batched(
            list(dict.fromkeys(ref.provider_id for ref in refs)), format="raw"
        )
        for message_id, result in results.items():
            if isinstance(result, dict):
                found[message_id] = self._fetched(result)
            elif result.status_code == 404:
                found[message_id] = PermanentProviderError(
                    f"message {message_id} was deleted before it could be read"
                )
            else:
                found[message_id] = translate(result, what=f"messages.get {message_id}")
        return [found[ref.provider_id] for ref in refs]

    def _fetched(self, result: dict[str, Any]) -> FetchedMessage:
        internal = result.get("internalDate")
        self._labels_of[str(result["id"])] = list(result.get("labelIds", []))
        return FetchedMessage(
            ref=MessageRef(str(result["id"]), result.get("threadId")),
            raw=unb64url(str(result.get("raw", ""))),
            thread_id=result.get("threadId"),
            labels=list(result.get("labelIds", [])),
            internal_date=datetime.fromtimestamp(int(internal) / 1000, UTC) if internal else None,
        )

    async def send(self, raw: bytes, thread_id: str | None = None) -> SentMessage:
        """`messages.send` through the upload endpoint (`uploadType=media`, or `multipart`
        with `{"threadId"}` for a reply), the path Gmail's docs give for messages of any size;
        the bytes go as they are. Not retried inline: a send may have been accepted before
        its answer was lost, and only `find_sent` can tell."""
        body = {"threadId": thread_id} if thread_id else None

        def build() -> Any:
            media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
            return self.client.users.messages().send(userId="me", body=body, media_body=media)

        try:
            result = await self.client.execute(
                build, what="messages.send", retries=0, translator=send_failure
            )
        except MediaUploadSizeError as exc:  # the client refuses before uploading
            raise SendRejected(f"messages.send: {exc}", SendRejection.TOO_LARGE) from exc
        return SentMessage(str(result["id"]), result.get("threadId"))

    async def find_sent(self, message_id: str) -> SentMessage | None:
        """`messages.list` with `q=rfc822msgid:<id>` (Gmail's search operator for the
        Message-ID header, written without angle brackets), spam and trash included: a sent
        message the user deleted was still sent."""
        bare = bare_message_id(message_id)
        if not bare:
            return None
        params: dict[str, Any] = {
            "userId": "me",
            "q": f"rfc822msgid:{bare}",
            "includeSpamTrash": True,
            "maxResults": 10,
        }
        result = await self.client.execute(
            functools.partial(self._messages_list, params), what="messages.list rfc822msgid"
        )
        found = result.get("messages") or []
        if not found:
            return None
        return SentMessage(str(found[0]["id"]), found[0].get("threadId"))

    async def mark(self, provider_ids: Sequence[str], label: str) -> None:
        if not provider_ids:
            return
        label_id = await self._label_id(label)
        # Once per message: those fetched with the label already keep it untouched.
        provider_ids = [i for i in provider_ids if label_id not in self._labels_of.get(i, [])]
        for start in range(0, len(provider_ids), BATCH_MODIFY_LIMIT):
            body = {
                "ids": list(provider_ids[start : start + BATCH_MODIFY_LIMIT]),
                "addLabelIds": [label_id],
            }
            await self.client.execute(
                functools.partial(self.client.users.messages().batchModify, userId="me", body=body),
                what="messages.batchModify",
            )

    async def _label_id(self, name: str) -> str:
        if name in self._label_ids:
            return self._label_ids[name]
        result = await self.client.execute(
            lambda: self.client.users.labels().list(userId="me"), what="labels.list"
        )
        for label in result.get("labels", []):
            if str(label.get("name", "")).lower() == name.lower():
                self._label_ids[name] = str(label["id"])
                return self._label_ids[name]
        created = await self.client.execute(
            lambda: self.client.users.labels().create(
                userId="me",
                body={
                    "name": name,
                    "labelListVisibility": "labelShow",
                    "messageListVisibility": "show",
                },
            ),
            what="labels.create",
        )
        self._label_ids[name] = str(created["id"])
        return self._label_ids[name]

    async def subscribe(self) -> datetime | None:
        """Gmail `watch` on INBOX and SENT; Google asks for a renewal at least weekly.

        Gmail publishes as gmail-api-push@system.gserviceaccount.com, which needs publish
        rights on the topic; without them `watch` answers 403 naming the topic. That is the
        operator's to fix (an ERROR log naming the setting, ProviderConfigurationError); mail
        still arrives, by polling, only later."""
        topic = self.settings.google_pubsub_topic
        try:
            result = await self.client.execute(
                lambda: self.client.users.watch(
                    userId="me",
                    body={
                        "topicName": topic,
                        "labelIds": list(SYNCED_LABELS),
                        "labelFilterBehavior": "include",
                    },
                ),
                what="watch",
            )
        except AccessDenied as exc:
            if topic not in exc.detail and "pubsub" not in exc.detail.lower():
                raise
            log.error(
                "Gmail refused to publish to %s (MAILSYNC_GOOGLE_PUBSUB_TOPIC): grant "
                "gmail-api-push@system.gserviceaccount.com the Pub/Sub Publisher role on it; "
                "until then mail arrives only by polling (%s)",
                topic,
                exc.detail,
            )
            raise ProviderConfigurationError(
                f"configuration: {exc.detail}",
                "grant gmail-api-push@system.gserviceaccount.com the Pub/Sub Publisher role "
                "on MAILSYNC_GOOGLE_PUBSUB_TOPIC",
            ) from exc
        expiration = result.get("expiration")
        return datetime.fromtimestamp(int(expiration) / 1000, UTC) if expiration else None

    async def unsubscribe(self) -> None:
        await self.client.execute(lambda: self.client.users.stop(userId="me"), what="stop")

    def updated_credentials(self) -> dict[str, Any] | None:
        return self.client.refreshed_credentials()

    async def close(self) -> None:
        self.client.close()
