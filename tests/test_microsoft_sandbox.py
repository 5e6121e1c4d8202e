"""The Microsoft sandbox through the real msgraph-sdk and plain OAuth token calls."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import uvicorn
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph.generated.models.body_type import BodyType
from msgraph.generated.models.email_address import EmailAddress
from msgraph.generated.models.item_body import ItemBody
from msgraph.generated.models.message import Message
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.recipient import Recipient
from msgraph.generated.models.subscription import Subscription
from msgraph.generated.users.item.messages.item.create_reply.create_reply_post_request_body import (
    CreateReplyPostRequestBody,
)
from msgraph.generated.users.item.send_mail.send_mail_post_request_body import (
    SendMailPostRequestBody,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from backend.sandbox.faults import Fault
from tests.conftest import free_port
from tests.factories import raw_message, unique
from tests.sandbox import SandboxServer, call, raw_b64

TENANT = "common"


def address() -> str:
    return f"{unique('ms')}@outlook.sandbox.test"


def prefer(value: str) -> RequestConfiguration[Any]:
    config: RequestConfiguration[Any] = RequestConfiguration()
    config.headers.add("Prefer", value)
    return config


class Receiver:
    """The app's side of Graph webhooks: answers the handshake, records notifications."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.echo_wrong = False

        async def hook(request: Request) -> Response:
            token = request.query_params.get("validationToken")
            if token is not None:
                return PlainTextResponse("nope" if self.echo_wrong else token)
            self.received.append(await request.json())
            return Response(status_code=202)

        self.server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=[Route("/hook", hook, methods=["POST"])]),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    task = asyncio.create_task(hook.server.serve())
    while not hook.server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    yield hook
    hook.server.should_exit = True
    await task


@pytest.fixture
async def sandbox(google_server: SandboxServer) -> AsyncIterator[SandboxServer]:
    yield google_server
    await google_server.microsoft.drain_notifications()
    google_server.google.faults.clear()


async def test_oauth_code_then_refresh_rotates_and_revocation_is_aadsts(
    sandbox: SandboxServer,
) -> None:
    """ "Refresh tokens in the Microsoft identity platform" (learn.microsoft.com/entra/
    identity-platform/refresh-tokens): refresh tokens replace themselves with a fresh token
    on every use, and the platform does not revoke the old one when it is used; revoking the
    grant ends them all (AADSTS50173)."""
    user = address()
    async with httpx.AsyncClient(base_url=sandbox.url, trust_env=False) as http:
        consent = await http.get(
            f"/{TENANT}/oauth2/v2.0/authorize",
            params={
                "client_id": "app",
                "response_type": "code",
                "redirect_uri": "http://127.0.0.1/cb",
                "scope": "offline_access Mail.ReadWrite Mail.Send User.Read",
                "state": "s1",
                "login_hint": user,
            },
        )
        assert consent.status_code == 302
        back = parse_qs(urlsplit(consent.headers["location"]).query)
        assert back["state"] == ["s1"]
        token = (
            await http.post(
                f"/{TENANT}/oauth2/v2.0/token",
                data={
                    "grant_type": "authorization_code",
                    "client_id": "app",
                    "client_secret": "x",
                    "code": back["code"][0],
                    "redirect_uri": "http://127.0.0.1/cb",
                },
            )
        ).json()
        assert token["token_type"] == "Bearer" and token["refresh_token"]
        assert "Mail.ReadWrite" in token["scope"].split()
        refreshed = (
            await http.post(
                f"/{TENANT}/oauth2/v2.0/token",
                data={
                    "grant_type": "refresh_token",
                    "client_id": "app",
                    "refresh_token": token["refresh_token"],
                },
            )
        ).json()
        assert refreshed["refresh_token"] != token["refresh_token"]
        used = await http.post(
            f"/{TENANT}/oauth2/v2.0/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "app",
                "refresh_token": token["refresh_token"],
            },
        )
        assert used.status_code == 200 and used.json()["refresh_token"] not in (
            token["refresh_token"],
            refreshed["refresh_token"],
        )
        unknown = await http.post(
            f"/{TENANT}/oauth2/v2.0/token",
            data={"grant_type": "refresh_token", "client_id": "app", "refresh_token": "0.AR-x"},
        )
        assert unknown.status_code == 400 and unknown.json()["error_codes"] == [70008]
        sandbox.microsoft.revoke_account(user)
        revoked = await http.post(
            f"/{TENANT}/oauth2/v2.0/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "app",
                "refresh_token": refreshed["refresh_token"],
            },
        )
        assert revoked.json()["error"] == "invalid_grant"
        assert revoked.json()["error_codes"] == [50173]


async def test_delta_pages_then_changes_then_410_when_the_sync_state_is_gone(
    sandbox: SandboxServer,
) -> None:
    user = address()
    sandbox.microsoft.ensure_account(user, ["sales@contoso.sandbox.test"])
    for n in range(3):
        sandbox.microsoft.deliver(user, raw_message("a@client.test", [user], f"Old {n}"))
    graph, http = sandbox.graph(user)
    try:
        me = await graph.me.get()
        assert me.mail == user and "smtp:sales@contoso.sandbox.test" in me.proxy_addresses
        inbox = graph.me.mail_folders.by_mail_folder_id("inbox")
        page = await inbox.messages.delta.get(prefer('odata.maxpagesize=2, IdType="ImmutableId"'))
        subjects = [m.subject for m in page.value]
        assert page.odata_next_link and page.odata_next_link.startswith(sandbox.url)
        page = await inbox.messages.delta.with_url(page.odata_next_link).get()
        subjects += [m.subject for m in page.value]
        assert sorted(subjects) == ["Old 0", "Old 1", "Old 2"]
        delta_link = page.odata_delta_link
        assert delta_link
        quiet = await inbox.messages.delta.with_url(delta_link).get()
        assert quiet.value == [] and quiet.odata_delta_link

        sandbox.microsoft.deliver(user, raw_message("a@client.test", [user], "New"))
        news = await inbox.messages.delta.with_url(quiet.odata_delta_link).get()
        assert [m.subject for m in news.value] == ["New"]
        raw = await graph.me.messages.by_message_id(news.value[0].id).content.get()
        assert b"Subject: New" in raw

        sandbox.microsoft.expire_delta(user)
        with pytest.raises(ODataError) as gone:
            await inbox.messages.delta.with_url(news.odata_delta_link).get()
        assert gone.value.response_status_code == 410
        assert gone.value.error.code == "syncStateNotFound"
    finally:
        await http.aclose()


async def test_send_mail_create_reply_and_categories(sandbox: SandboxServer) -> None:
    alice, bob = address(), address()
    sandbox.microsoft.ensure_account(alice)
    sandbox.microsoft.ensure_account(bob)
    graph, http = sandbox.graph(alice)
    bob_graph, bob_http = sandbox.graph(bob)
    try:
        await graph.me.send_mail.post(
            SendMailPostRequestBody(
                message=Message(
                    subject="Quote",
                    body=ItemBody(content_type=BodyType.Text, content="40 seats?"),
                    to_recipients=[Recipient(email_address=EmailAddress(address=bob))],
                ),
                save_to_sent_items=True,
            )
        )
        bob_box = sandbox.microsoft.account(bob)
        alice_box = sandbox.microsoft.account(alice)
        assert bob_box is not None and alice_box is not None
        received = next(iter(bob_box.messages.values()))
        sent = next(m for m in alice_box.messages.values() if not m.is_draft)
        assert sent.folder_id == alice_box.folder("sentitems").id
        assert received.internet_message_id == sent.internet_message_id

        draft = await bob_graph.me.messages.by_message_id(received.id).create_reply.post(
            CreateReplyPostRequestBody(comment="Yes, forty.")
        )
        assert draft.conversation_id == received.conversation_id and draft.is_draft
        await bob_graph.me.messages.by_message_id(draft.id).send.post()
        reply = next(
            m for m in alice_box.messages.values() if m.folder_id == alice_box.folder("inbox").id
        )
        assert reply.conversation_id == sent.conversation_id
        assert reply.parsed()["In-Reply-To"] == sent.internet_message_id

        await graph.me.messages.by_message_id(reply.id).patch(Message(categories=["CRM"]))
        assert reply.categories == ["CRM"]
    finally:
        await http.aclose()
        await bob_http.aclose()


async def test_subscriptions_validate_notify_and_lifecycle(
    sandbox: SandboxServer, receiver: Receiver
) -> None:
    user = address()
    sandbox.microsoft.ensure_account(user)
    graph, http = sandbox.graph(user)
    try:
        with pytest.raises(ODataError) as too_long:
            await graph.subscriptions.post(
                Subscription(
                    change_type="created",
                    notification_url=receiver.url,
                    resource="me/mailFolders('inbox')/messages",
                    expiration_date_time=datetime.now(UTC) + timedelta(days=30),
                )
            )
        assert too_long.value.response_status_code == 400

        soon = datetime.now(UTC) + timedelta(days=2)
        receiver.echo_wrong = True
        with pytest.raises(ODataError) as refused:
            await graph.subscriptions.post(
                Subscription(
                    change_type="created",
                    notification_url=receiver.url,
                    resource="me/mailFolders('inbox')/messages",
                    expiration_date_time=soon,
                )
            )
        assert refused.value.error.code == "ValidationError"
        receiver.echo_wrong = False
        created = await graph.subscriptions.post(
            Subscription(
                change_type="created",
                notification_url=receiver.url,
                lifecycle_notification_url=receiver.url,
                resource="me/mailFolders('inbox')/messages",
                expiration_date_time=soon,
                client_state="s3cret",
            )
        )
        assert created.id
        message = sandbox.microsoft.deliver(user, raw_message("c@client.test", [user], "Ping"))
        await sandbox.microsoft.drain_notifications()
        [notice] = receiver.received
        assert notice["value"][0]["clientState"] == "s3cret"
        assert notice["value"][0]["resourceData"]["id"] == message.id

        renewed = await graph.subscriptions.by_subscription_id(created.id).patch(
            Subscription(expiration_date_time=soon + timedelta(days=1))
        )
        assert renewed.expiration_date_time > created.expiration_date_time

        sandbox.microsoft.lifecycle(created.id, "subscriptionRemoved")
        await sandbox.microsoft.drain_notifications()
        assert receiver.received[-1]["value"][0]["lifecycleEvent"] == "subscriptionRemoved"
        assert created.id not in sandbox.microsoft.subscriptions
    finally:
        await http.aclose()


async def test_faults_and_a_disabled_mailbox(sandbox: SandboxServer) -> None:
    user = address()
    sandbox.microsoft.ensure_account(user)
    graph, http = sandbox.graph(user)
    try:
        # kiota's retry handler honours Retry-After on a 429 and retries by itself.
        fault = sandbox.microsoft.faults.add(
            Fault(status=429, retry_after=1, account=user, path="/me$", times=1)
        )
        assert (await graph.me.get()).mail == user
        assert fault.hits == 1
        sandbox.microsoft.account(user).enabled = False  # type: ignore[union-attr]
        with pytest.raises(ODataError) as missing:
            await graph.me.mail_folders.get()
        assert missing.value.error.code == "MailboxNotEnabledForRESTAPI"
    finally:
        await http.aclose()


async def test_mail_crosses_between_gmail_and_outlook_sandboxes(sandbox: SandboxServer) -> None:
    outlook, gmail = address(), f"{unique('gm')}@gmail.sandbox.test"
    sandbox.microsoft.ensure_account(outlook)
    sandbox.google.ensure_account(gmail)
    graph, http = sandbox.graph(outlook)
    try:
        await graph.me.send_mail.post(
            SendMailPostRequestBody(
                message=Message(
                    subject="To Gmail",
                    body=ItemBody(content_type=BodyType.Text, content="hi"),
                    to_recipients=[Recipient(email_address=EmailAddress(address=gmail))],
                )
            )
        )
    finally:
        await http.aclose()
    gmail_box = sandbox.google.account(gmail)
    assert gmail_box is not None
    assert [m.parsed()["Subject"] for m in gmail_box.messages.values()] == ["To Gmail"]
    await call(
        sandbox.gmail(gmail)
        .users()
        .messages()
        .send(userId="me", body={"raw": raw_b64(raw_message(gmail, [outlook], "Back"))})
    )
    outlook_box = sandbox.microsoft.account(outlook)
    assert outlook_box is not None
    inbox = outlook_box.folder("inbox").id
    assert [
        m.parsed()["Subject"] for m in outlook_box.messages.values() if m.folder_id == inbox
    ] == ["Back"]


def mime(sender: str, to: list[str], subject: str, **kwargs: Any) -> bytes:
    raw = raw_message(sender, to, subject, "body", **kwargs)
    return b"X-Crm: 7\r\nOrganization: Acme\r\n" + raw.replace(b"\n", b"\r\n")


async def test_r15_send_mail_and_drafts_take_base64_mime_and_keep_it(
    sandbox: SandboxServer,
) -> None:
    alice, bob = address(), address()
    sandbox.microsoft.ensure_account(bob)
    token = sandbox.microsoft.mint_token(alice)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
    raw = mime(alice, [bob], "Quote", message_id="<q-1@crm.test>")
    async with httpx.AsyncClient(base_url=f"{sandbox.url}/v1.0", trust_env=False) as http:
        sent = await http.post("/me/sendMail", content=base64.b64encode(raw), headers=headers)
        assert sent.status_code == 202, sent.text
        bad = await http.post("/me/sendMail", content=b"not base64 at all!", headers=headers)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "ErrorMimeContentInvalidBase64String"
        big = base64.b64encode(mime(alice, [bob], "Big", html="x" * 3_200_000))
        assert len(big) > 4 * 1024 * 1024
        too_big = await http.post("/me/sendMail", content=big, headers=headers)
        assert too_big.status_code == 413
        alice_box, bob_box = sandbox.microsoft.account(alice), sandbox.microsoft.account(bob)
        assert alice_box is not None and bob_box is not None
        (copy,) = alice_box.messages.values()
        assert copy.raw == raw and copy.internet_message_id == "<q-1@crm.test>"
        (received,) = bob_box.messages.values()
        assert received.raw == raw and received.parsed()["Organization"] == "Acme"
        value = await http.get(f"/me/messages/{copy.id}/$value", headers=headers)
        assert value.content == raw

        # Bob replies with MIME through createReply: with ImmutableId the draft's id is the
        # Sent Items copy's; without it, the id changes on the way (as Graph's regular ids).
        bob_headers = {
            "Authorization": f"Bearer {sandbox.microsoft.mint_token(bob)}",
            "Content-Type": "text/plain",
        }
        ids = []
        for prefer in ('IdType="ImmutableId"', None):
            reply = mime(bob, [alice], "Re: Quote", in_reply_to="<q-1@crm.test>")
            extra = {"Prefer": prefer} if prefer else {}
            made = await http.post(
                f"/me/messages/{received.id}/createReply",
                content=base64.b64encode(reply),
                headers={**bob_headers, **extra},
            )
            assert made.status_code == 201, made.text
            draft = made.json()
            assert draft["isDraft"] and draft["conversationId"] == received.conversation_id
            listed = await http.get(
                "/me/messages",
                params={"$filter": f"internetMessageId eq '{draft['internetMessageId']}'"},
                headers=bob_headers,
            )
            assert [m["isDraft"] for m in listed.json()["value"]] == [True]
            assert (
                await http.post(f"/me/messages/{draft['id']}/send", headers=bob_headers)
            ).status_code == 202
            sent_copy = next(
                m
                for m in bob_box.messages.values()
                if m.internet_message_id == draft["internetMessageId"]
            )
            assert sent_copy.raw == reply and sent_copy.conversation_id == received.conversation_id
            ids.append(sent_copy.id == draft["id"])
        assert ids == [True, False]


async def test_r15_an_after_delay_fault_accepts_send_mail_then_answers_late(
    sandbox: SandboxServer,
) -> None:
    alice, bob = address(), address()
    sandbox.microsoft.ensure_account(bob)
    headers = {
        "Authorization": f"Bearer {sandbox.microsoft.mint_token(alice)}",
        "Content-Type": "text/plain",
    }
    async with httpx.AsyncClient(base_url=sandbox.url, trust_env=False) as http:
        await http.post(
            "/_sandbox/faults",
            json={"afterDelaySeconds": 0.5, "status": 503, "account": alice, "path": "sendMail"},
        )
        started = asyncio.get_running_loop().time()
        answer = await http.post(
            "/v1.0/me/sendMail",
            content=base64.b64encode(mime(alice, [bob], "Late")),
            headers=headers,
        )
        assert answer.status_code == 503
        assert asyncio.get_running_loop().time() - started >= 0.5
        await http.delete("/_sandbox/faults")
    bob_box = sandbox.microsoft.account(bob)
    assert bob_box is not None and len(bob_box.messages) == 1


async def test_outlook_service_limits_four_concurrent_requests_and_a_request_window(
    sandbox: SandboxServer,
) -> None:
    """Graph throttling limits, "Outlook service limits" (learn.microsoft.com/graph/
    throttling-limits#outlook-service-limits): per app ID and mailbox, 4 concurrent requests
    (MailboxConcurrency) and 10,000 requests per 10 minutes; past either Graph answers 429
    with a Retry-After (Graph "throttling" guidance). Here the window is shortened for the
    test, the rule is the same."""
    user = address()
    account = sandbox.microsoft.ensure_account(user)
    account.latency = 0.3  # each request takes time, so six of them overlap
    graph, http = sandbox.graph(user)
    try:
        token = sandbox.microsoft.mint_token(user)

        async def me(limit: str = "MailboxConcurrency") -> int:
            response = await http.get(
                sandbox.url + "/v1.0/me", headers={"Authorization": f"Bearer {token}"}
            )
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "ApplicationThrottled"
                assert limit in response.json()["error"]["message"]
                assert float(response.headers["retry-after"]) > 0
            return response.status_code

        statuses = await asyncio.gather(*(me() for _ in range(6)))
        assert sorted(statuses) == [200, 200, 200, 200, 429, 429]
        assert account.most_in_flight == 4 and account.throttled == 2

        account.latency = 0.0
        account.request_limit = (3, 600.0)
        sandbox.microsoft._recent.clear()
        assert [await me("MailboxRequestLimit") for _ in range(4)] == [200, 200, 200, 429]
        refused = await http.get(
            sandbox.url + "/v1.0/me", headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 429 and 500 < float(refused.headers["retry-after"]) <= 601
    finally:
        account.request_limit = None
        await http.aclose()
        del graph


@pytest.mark.parametrize(
    ("reason", "message", "codes"),
    [
        ("invalid_client", None, [7000215]),
        (
            "invalid_client",
            "AADSTS7000222: The provided client secret keys are expired.",
            [7000222],
        ),
        ("temporarily_unavailable", "The server is temporarily too busy.", []),
        ("interaction_required", None, [50076]),
    ],
)
async def test_token_endpoint_faults_answer_oauth_errors_with_aadsts_codes(
    sandbox: SandboxServer, reason: str, message: str | None, codes: list[int]
) -> None:
    """The identity platform's error shape ("Microsoft identity platform and OAuth 2.0
    authorization code flow", error response; "Microsoft Entra authentication and
    authorization error codes"): `error` is the OAuth name, `error_codes` the AADSTS codes,
    `error_description` starts with "AADSTS<code>:"."""
    user = address()
    sandbox.microsoft.ensure_account(user)
    sandbox.microsoft.mint_token(user)
    grant = next(g for g in sandbox.microsoft.grants.values() if g.email == user)
    sandbox.microsoft.faults.add(
        Fault(status=400, reason=reason, message=message, account=user, path="/token", times=1)
    )
    async with httpx.AsyncClient(base_url=sandbox.url, trust_env=False) as http:
        answer = await http.post(
            f"/{TENANT}/oauth2/v2.0/token",
            data={
                "grant_type": "refresh_token",
                "client_id": "sandbox-admin",
                "refresh_token": grant.refresh_token,
            },
        )
    body = answer.json()
    assert answer.status_code == 400 and body["error"] == reason
    assert body["error_codes"] == codes
    assert body["error_description"].startswith(f"AADSTS{codes[0]}:" if codes else "The server")
