"""The Google sandbox answers the real google-api-python-client and google-auth as Google
does, for every call mailsync makes (docs/providers.md, "Gmail API v1")."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request as AuthRequest
from google.oauth2.credentials import Credentials
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseUpload

from backend.sandbox.google import MAX_SEND_BYTES, unb64url
from backend.sandbox.wire import SubRequest
from tests.factories import raw_message, unique
from tests.sandbox import SandboxServer, call, raw_b64
from tests.sync_helpers import wait_until


def address(prefix: str = "user") -> str:
    return f"{unique(prefix)}@gmail.sandbox.test"


async def insert(box: Any, raw: bytes, labels: list[str] | None = None) -> dict[str, Any]:
    body = {"raw": raw_b64(raw), "labelIds": labels or ["INBOX", "UNREAD"]}
    result: dict[str, Any] = await call(box.users().messages().insert(userId="me", body=body))
    return result


async def test_oauth_code_flow_refresh_and_revocation(google_server: SandboxServer) -> None:
    me = address()
    scopes = ["https://www.googleapis.com/auth/gmail.modify"]
    async with httpx.AsyncClient(base_url=google_server.url) as http:
        consent = await http.get(
            "/o/oauth2/v2/auth",
            params={
                "client_id": "cid",
                "redirect_uri": "http://app.test/cb",
                "response_type": "code",
                "scope": " ".join(scopes),
                "state": "s-1",
                "login_hint": me,
                "access_type": "offline",
            },
        )
        assert consent.status_code == 302
        back = parse_qs(urlsplit(consent.headers["location"]).query)
        assert back["state"] == ["s-1"]
        wrong = await http.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": back["code"][0],
                "client_id": "other",
                "redirect_uri": "http://app.test/cb",
            },
        )
        assert wrong.status_code == 401
        consent = await http.get(consent.request.url)
        code = parse_qs(urlsplit(consent.headers["location"]).query)["code"][0]
        exchanged = await http.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "client_id": "cid",
                "client_secret": "x",
                "redirect_uri": "http://app.test/cb",
            },
        )
        tokens = exchanged.json()
        assert tokens["scope"] == scopes[0] and tokens["refresh_token"] and tokens["expires_in"] > 0
        reused = await http.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "client_id": "cid",
                "redirect_uri": "http://app.test/cb",
            },
        )
        assert reused.json()["error"] == "invalid_grant"

    creds = Credentials(  # type: ignore[no-untyped-call]
        token=None,
        refresh_token=tokens["refresh_token"],
        token_uri=google_server.url + "/token",
        client_id="cid",
        client_secret="x",
        scopes=scopes,
    )
    await asyncio.to_thread(creds.refresh, AuthRequest())  # type: ignore[no-untyped-call]
    assert creds.token and creds.token != tokens["access_token"]
    google_server.google.revoke_account(me)
    with pytest.raises(RefreshError) as refused:
        await asyncio.to_thread(creds.refresh, AuthRequest())  # type: ignore[no-untyped-call]
    assert "invalid_grant" in str(refused.value)


async def test_consent_page_without_login_hint_and_denial(google_server: SandboxServer) -> None:
    params = {
        "client_id": "cid",
        "redirect_uri": "http://app.test/cb",
        "response_type": "code",
        "scope": "openid",
        "state": "s",
    }
    async with httpx.AsyncClient(base_url=google_server.url) as http:
        page = await http.get("/o/oauth2/v2/auth", params=params)
        assert page.status_code == 200 and "login_hint" in page.text
        denied = await http.get(
            "/o/oauth2/v2/auth", params={**params, "login_hint": address(), "decision": "deny"}
        )
        assert parse_qs(urlsplit(denied.headers["location"]).query) == {
            "error": ["access_denied"],
            "state": ["s"],
        }


async def test_insert_list_and_get_in_every_format(google_server: SandboxServer) -> None:
    me = address()
    box = google_server.gmail(me)
    raw = raw_message("ann@client.test", [me], "Quote", "Plain part", html="<p>Rich part</p>")
    added = await insert(box, raw)
    messages = box.users().messages()
    got = await call(messages.get(userId="me", id=added["id"], format="raw"))
    assert unb64url(got["raw"]) == raw and got["labelIds"] == ["INBOX", "UNREAD"]
    assert int(got["internalDate"]) > 0 and got["snippet"].startswith("Plain part")
    full = await call(messages.get(userId="me", id=added["id"], format="full"))
    assert full["payload"]["mimeType"] == "multipart/alternative"
    html_part = full["payload"]["parts"][1]
    assert unb64url(html_part["body"]["data"]).strip() == b"<p>Rich part</p>"
    meta = await call(
        messages.get(userId="me", id=added["id"], format="metadata", metadataHeaders=["Subject"])
    )
    assert meta["payload"]["headers"] == [{"name": "Subject", "value": "Quote"}]
    minimal = await call(messages.get(userId="me", id=added["id"], format="minimal"))
    assert "payload" not in minimal and "raw" not in minimal
    listed = await call(messages.list(userId="me", labelIds=["INBOX"], q="after:1000000"))
    assert listed["messages"] == [{"id": added["id"], "threadId": added["threadId"]}]
    none = await call(messages.list(userId="me", labelIds=["SENT"]))
    assert "messages" not in none and none["resultSizeEstimate"] == 0
    with pytest.raises(HttpError) as missing:
        await call(messages.get(userId="me", id="ffff", format="raw"))
    assert missing.value.status_code == 404


async def test_send_by_json_media_multipart_and_resumable_upload(
    google_server: SandboxServer,
) -> None:
    me, friend = address("me"), address("friend")
    box = google_server.gmail(me)
    google_server.google.ensure_account(friend)
    messages = box.users().messages()
    first = raw_message(me, [friend], "Plan", "v1")
    sent = await call(messages.send(userId="me", body={"raw": raw_b64(first)}))
    assert sent["labelIds"] == ["SENT"]
    for resumable in (False, True):
        media = MediaIoBaseUpload(
            io.BytesIO(raw_message(me, [friend], "Plan", "upload")),
            mimetype="message/rfc822",
            resumable=resumable,
        )
        result = await call(messages.send(userId="me", body={}, media_body=media))
        assert result["labelIds"] == ["SENT"]
    media = MediaIoBaseUpload(
        io.BytesIO(raw_message(me, [friend], "Plan", "multi")), mimetype="message/rfc822"
    )
    # A metadata body with a media body makes the client use uploadType=multipart.
    multi = await call(messages.send(userId="me", body={"labelIds": []}, media_body=media))
    assert multi["labelIds"] == ["SENT"]
    inbox = await call(
        google_server.gmail(friend).users().messages().list(userId="me", labelIds=["INBOX"])
    )
    assert len(inbox["messages"]) == 4


async def test_send_delivers_threads_and_hides_bcc(google_server: SandboxServer) -> None:
    me, friend, secret = address("me"), address("friend"), address("bcc")
    for who in (friend, secret):
        google_server.google.ensure_account(who)
    box = google_server.gmail(me)
    original = raw_message(
        me, [friend], "Plan", "first", bcc=[secret], message_id="<plan-1@me.test>"
    )
    sent = await call(box.users().messages().send(userId="me", body={"raw": raw_b64(original)}))
    theirs = google_server.gmail(friend).users().messages()
    got = (await call(theirs.list(userId="me")))["messages"][0]
    raw = unb64url((await call(theirs.get(userId="me", id=got["id"], format="raw")))["raw"])
    assert b"Bcc:" not in raw and b"plan-1@me.test" in raw
    hidden = google_server.gmail(secret).users().messages()
    assert len((await call(hidden.list(userId="me")))["messages"]) == 1
    mine = unb64url(
        (await call(box.users().messages().get(userId="me", id=sent["id"], format="raw")))["raw"]
    )
    assert b"Bcc:" in mine
    # The friend replies: it joins the thread in both mailboxes.
    reply = raw_message(friend, [me], "Re: Plan", "ok", in_reply_to="<plan-1@me.test>")
    answered = await call(
        theirs.send(userId="me", body={"raw": raw_b64(reply), "threadId": got["threadId"]})
    )
    assert answered["threadId"] == got["threadId"]
    mine_now = await call(box.users().messages().list(userId="me", labelIds=["INBOX"]))
    assert mine_now["messages"][0]["threadId"] == sent["threadId"]
    # A different subject never joins, even with a threadId.
    other = raw_message(friend, [me], "Unrelated", "x", in_reply_to="<plan-1@me.test>")
    apart = await call(
        theirs.send(userId="me", body={"raw": raw_b64(other), "threadId": got["threadId"]})
    )
    assert apart["threadId"] != got["threadId"]


async def test_history_pages_filters_and_answers_404_past_the_horizon(
    google_server: SandboxServer,
) -> None:
    me = address()
    box = google_server.gmail(me)
    users = box.users()
    start = (await call(users.getProfile(userId="me")))["historyId"]
    added = [await insert(box, raw_message("a@client.test", [me], f"n{i}")) for i in range(3)]
    await call(
        users.messages().modify(userId="me", id=added[0]["id"], body={"removeLabelIds": ["UNREAD"]})
    )
    first = await call(
        users.history().list(
            userId="me", startHistoryId=start, maxResults=2, historyTypes=["messageAdded"]
        )
    )
    assert [h["messagesAdded"][0]["message"]["id"] for h in first["history"]] == [
        a["id"] for a in added[:2]
    ]
    rest = await call(
        users.history().list(
            userId="me",
            startHistoryId=start,
            maxResults=2,
            historyTypes=["messageAdded"],
            pageToken=first["nextPageToken"],
        )
    )
    assert [h["messagesAdded"][0]["message"]["id"] for h in rest["history"]] == [added[2]["id"]]
    assert "nextPageToken" not in rest
    ids = [int(h["id"]) for h in first["history"] + rest["history"]]
    assert ids == sorted(ids) and int(rest["historyId"]) > ids[-1]
    removed = await call(
        users.history().list(userId="me", startHistoryId=start, historyTypes=["labelRemoved"])
    )
    assert removed["history"][0]["labelsRemoved"][0]["labelIds"] == ["UNREAD"]
    google_server.google.expire_history(me)
    with pytest.raises(HttpError) as too_old:
        await call(users.history().list(userId="me", startHistoryId=start))
    assert too_old.value.status_code == 404
    with pytest.raises(HttpError) as missing:
        await call(users.history().list(userId="me", startHistoryId=""))
    assert missing.value.status_code == 400


async def test_batch_get_answers_each_part(google_server: SandboxServer) -> None:
    me = address()
    box = google_server.gmail(me)
    added = [await insert(box, raw_message("a@client.test", [me], f"n{i}")) for i in range(3)]
    results: dict[str, Any] = {}

    def run() -> None:
        batch = box.new_batch_http_request()
        for message_id in [a["id"] for a in added] + ["ffff"]:
            batch.add(
                box.users().messages().get(userId="me", id=message_id, format="raw"),
                request_id=message_id,
                callback=lambda rid, resp, exc: results.__setitem__(rid, exc or resp),
            )
        batch.execute()

    await asyncio.to_thread(run)
    assert all(results[a["id"]]["id"] == a["id"] for a in added)
    assert isinstance(results["ffff"], HttpError) and results["ffff"].status_code == 404


async def test_labels_and_modify(google_server: SandboxServer) -> None:
    me = address()
    box = google_server.gmail(me)
    labels = box.users().labels()
    crm = await call(labels.create(userId="me", body={"name": "CRM"}))
    with pytest.raises(HttpError) as duplicate:
        await call(labels.create(userId="me", body={"name": "crm"}))
    assert duplicate.value.status_code == 409
    names = {label["name"] for label in (await call(labels.list(userId="me")))["labels"]}
    assert {"INBOX", "SENT", "CRM"} <= names
    added = await insert(box, raw_message("a@client.test", [me]))
    modified = await call(
        box.users()
        .messages()
        .modify(userId="me", id=added["id"], body={"addLabelIds": [crm["id"]]})
    )
    assert crm["id"] in modified["labelIds"]
    with pytest.raises(HttpError) as invalid:
        await call(
            box.users()
            .messages()
            .modify(userId="me", id=added["id"], body={"addLabelIds": ["Nope"]})
        )
    assert invalid.value.status_code == 400


async def test_faults_quota_scopes_and_expired_tokens(google_server: SandboxServer) -> None:
    me = address()
    box = google_server.gmail(me)
    sandbox = google_server.google
    sandbox.faults.add(fault(account=me, status=429, retry_after=7, times=1, path="/profile"))
    with pytest.raises(HttpError) as limited:
        await call(box.users().getProfile(userId="me"))
    assert limited.value.status_code == 429 and limited.value.resp["retry-after"] == "7"
    sandbox.faults.add(fault(account=me, status=403, reason="userRateLimitExceeded", times=1))
    with pytest.raises(HttpError) as per_user:
        await call(box.users().getProfile(userId="me"))
    # Google's body: the catalogue reason under `errors`, a google.rpc.ErrorInfo under
    # `details` (which the client library keeps as `error_details`).
    body = json.loads(per_user.value.content)["error"]
    assert body["errors"][0] == {
        "message": "User Rate Limit Exceeded",
        "domain": "usageLimits",
        "reason": "userRateLimitExceeded",
    }
    assert per_user.value.error_details[0]["reason"] == "RATE_LIMIT_EXCEEDED"
    sandbox.faults.add(fault(account=me, status=503, times=1))
    with pytest.raises(HttpError) as down:
        await call(box.users().getProfile(userId="me"))
    assert down.value.status_code == 503
    assert (await call(box.users().getProfile(userId="me")))["emailAddress"] == me
    reader = google_server.gmail(me, ["https://www.googleapis.com/auth/gmail.readonly"])
    with pytest.raises(HttpError) as scope:
        await call(
            reader.users()
            .messages()
            .send(userId="me", body={"raw": raw_b64(raw_message(me, ["x@y.test"]))})
        )
    assert json.loads(scope.value.content)["error"]["errors"][0]["reason"] == (
        "insufficientPermissions"
    )
    assert scope.value.error_details[0]["reason"] == "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
    sandbox.ensure_account(me).daily_send_limit = 0
    with pytest.raises(HttpError) as sending:
        await call(
            box.users()
            .messages()
            .send(userId="me", body={"raw": raw_b64(raw_message(me, ["x@y.test"]))})
        )
    assert sending.value.status_code == 429
    sandbox.expire_access_tokens(me)
    # The 401 makes google-auth refresh, which this token (minted, no refresh token) cannot.
    with pytest.raises(RefreshError):
        await call(box.users().getProfile(userId="me"))


async def test_watch_pushes_a_pubsub_envelope_after_a_change(google_server: SandboxServer) -> None:
    me = address()
    box = google_server.gmail(me)
    sandbox = google_server.google
    received: list[tuple[str, dict[str, Any]]] = []
    original_sink = sandbox.push_sink

    async def capture(endpoint: str, envelope: dict[str, Any]) -> None:
        received.append((endpoint, envelope))

    sandbox.push_sink = capture
    sandbox.push_endpoints["projects/p/topics/mine"] = "http://app.test/push"
    try:
        with pytest.raises(HttpError):
            await call(box.users().watch(userId="me", body={"topicName": "not-a-topic"}))
        watched = await call(
            box.users().watch(
                userId="me",
                body={
                    "topicName": "projects/p/topics/mine",
                    "labelIds": ["INBOX"],
                    "labelFilterBehavior": "INCLUDE",
                },
            )
        )
        assert int(watched["expiration"]) > 0
        await insert(box, raw_message(me, ["x@y.test"]), labels=["SENT"])  # filtered out
        await asyncio.sleep(0.3)
        assert received == []
        await insert(box, raw_message("a@client.test", [me]))
        async with asyncio.timeout(30):
            while True:
                if received:
                    break
                await asyncio.sleep(0.02)
        endpoint, envelope = received[0]
        notice = json.loads(unb64url(envelope["message"]["data"]))
        assert endpoint == "http://app.test/push" and notice["emailAddress"] == me
        assert notice["historyId"] == int(
            (await call(box.users().getProfile(userId="me")))["historyId"]
        )
        assert envelope["subscription"].startswith("projects/p/subscriptions/")
        await call(box.users().stop(userId="me"))
        await insert(box, raw_message("a@client.test", [me]))
        await asyncio.sleep(0.5)
        assert len(received) == 1
    finally:
        sandbox.push_sink = original_sink


def fault(**kwargs: Any) -> Any:
    from backend.sandbox.faults import Fault

    return Fault(**kwargs)


async def test_r15_send_keeps_the_mime_and_rfc822msgid_finds_it(
    google_server: SandboxServer,
) -> None:
    me, friend = address("me"), address("friend")
    google_server.google.ensure_account(friend)
    box = google_server.gmail(me).users().messages()
    raw = raw_message(me, [friend], "Plan", "as is", message_id="<keep-1@crm.test>")
    raw = b"X-Crm: 7\r\nOrganization: Acme\r\n" + raw.replace(b"\n", b"\r\n")
    media = MediaIoBaseUpload(io.BytesIO(raw), mimetype="message/rfc822", resumable=False)
    sent = await call(box.send(userId="me", media_body=media))
    stored = google_server.google.account(me).messages[sent["id"]]  # type: ignore[union-attr]
    assert stored.raw == raw
    for query in ("rfc822msgid:keep-1@crm.test", "rfc822msgid:<keep-1@crm.test>"):
        found = await call(box.list(userId="me", q=query))
        assert found["messages"] == [{"id": sent["id"], "threadId": sent["threadId"]}]
    theirs = google_server.gmail(friend).users().messages()
    assert (
        len((await call(theirs.list(userId="me", q="rfc822msgid:keep-1@crm.test")))["messages"])
        == 1
    )
    assert "messages" not in await call(box.list(userId="me", q="rfc822msgid:other@crm.test"))


async def test_r15_sending_limits_answer_as_gmail_documents(google_server: SandboxServer) -> None:
    me, friend = address("me"), address("friend")
    sandbox = google_server.google
    sandbox.ensure_account(friend)
    box = google_server.gmail(me).users().messages()
    many = raw_message(me, [f"r{n}@x.test" for n in range(101)], "Many", "x")
    with pytest.raises(HttpError) as too_many:
        await call(box.send(userId="me", body={"raw": raw_b64(many)}))
    assert too_many.value.status_code == 400 and "Too many recipients" in str(too_many.value.reason)
    huge = SubRequest(
        "POST",
        "/upload/gmail/v1/users/me/messages/send",
        {"uploadType": ["media"]},
        {"authorization": f"Bearer {sandbox.mint_token(me)}", "content-type": "message/rfc822"},
        raw_message(me, [friend], "Big", "x" * (MAX_SEND_BYTES + 1)),
    )
    answer = await sandbox.handle(huge)
    assert answer.status == 413 and json.loads(answer.body)["error"]["code"] == 413
    async with httpx.AsyncClient(base_url=google_server.url, trust_env=False) as http:
        set_limit = await http.post(f"/_sandbox/google/accounts/{me}/send-limit", json={"limit": 1})
        assert set_limit.status_code == 200
    await call(box.send(userId="me", body={"raw": raw_b64(raw_message(me, [friend]))}))
    with pytest.raises(HttpError) as daily:
        await call(box.send(userId="me", body={"raw": raw_b64(raw_message(me, [friend]))}))
    assert daily.value.status_code == 429
    assert "(Mail sending)" in str(daily.value.reason)
    assert 86_000 < int(daily.value.resp["retry-after"]) <= 86_401


async def test_r15_an_after_delay_fault_accepts_the_send_then_answers_late(
    google_server: SandboxServer,
) -> None:
    me, friend = address("me"), address("friend")
    google_server.google.ensure_account(friend)
    box = google_server.gmail(me).users().messages()
    async with httpx.AsyncClient(base_url=google_server.url, trust_env=False) as http:
        made = await http.post(
            "/_sandbox/faults",
            json={"afterDelaySeconds": 0.5, "status": 500, "account": me, "path": "/send$"},
        )
        assert made.json()["afterDelaySeconds"] == 0.5
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(HttpError) as late:
                await call(box.send(userId="me", body={"raw": raw_b64(raw_message(me, [friend]))}))
            assert late.value.status_code == 500
            assert asyncio.get_running_loop().time() - started >= 0.5
        finally:
            await http.delete("/_sandbox/faults")
    theirs = google_server.google.account(friend)
    assert theirs is not None and len(theirs.messages) == 1


async def test_per_user_quota_as_documented_without_retry_after(
    google_server: SandboxServer,
) -> None:
    """Gmail API "Usage limits" (developers.google.com/workspace/gmail/api/reference/quota):
    15,000 quota units per user per minute, exceeded reason `userRateLimitExceeded`;
    messages.get 5 units, messages.delete 10, stop 50, getProfile 1. "Resolve errors" (guides/
    handle-errors): a rate-limited call answers 403 `userRateLimitExceeded` or 429 "Too many
    requests" and is to be retried with exponential backoff: no Retry-After is sent. Batching
    guide: calls inside a batch are counted one by one. The window is shortened here, the
    rule is the same."""
    me = address()
    sandbox = google_server.google
    assert (sandbox.quota_units, sandbox.quota_window_seconds) == (15_000, 60.0)
    box = google_server.gmail(me)
    ids = [(await insert(box, raw_message("a@b.test", [me], f"M{i}")))["id"] for i in range(4)]
    sandbox.set_quota(me, 20, window_seconds=600)
    answers: dict[str, Any] = {}
    batch = box.new_batch_http_request()
    for message_id in ids:
        batch.add(
            box.users().messages().get(userId="me", id=message_id),
            request_id=message_id,
            callback=lambda rid, response, exc: answers.__setitem__(rid, exc or response),
        )
    await asyncio.to_thread(batch.execute)
    assert all(isinstance(answers[i], dict) for i in ids)  # 4 x 5 units: the whole quota
    with pytest.raises(HttpError) as lone:
        await call(box.users().getProfile(userId="me"))
    assert lone.value.status_code == 403 and "retry-after" not in lone.value.resp
    assert json.loads(lone.value.content)["error"]["errors"][0]["reason"] == (
        "userRateLimitExceeded"
    )
    answers.clear()
    batch = box.new_batch_http_request()
    batch.add(
        box.users().messages().get(userId="me", id=ids[0]),
        request_id="one",
        callback=lambda rid, response, exc: answers.__setitem__(rid, exc or response),
    )
    await asyncio.to_thread(batch.execute)
    assert isinstance(answers["one"], HttpError) and answers["one"].status_code == 429
    assert "retry-after" not in answers["one"].resp
    # Costs: a delete is 10 units, stop 50 (more than this quota holds, so refused).
    sandbox.set_quota(me, 15, window_seconds=600)
    await call(box.users().messages().delete(userId="me", id=ids[0]))
    with pytest.raises(HttpError):
        await call(box.users().messages().delete(userId="me", id=ids[1]))
    sandbox.set_quota(me, 49, window_seconds=600)
    with pytest.raises(HttpError) as stop:
        await call(box.users().stop(userId="me"))
    assert stop.value.status_code == 403
    sandbox.set_quota(me, 50, window_seconds=600)
    await call(box.users().stop(userId="me"))
    # The window moves: what was spent more than a window ago counts no more.
    sandbox.set_quota(me, 5, window_seconds=0.5)
    await call(box.users().messages().get(userId="me", id=ids[1]))
    with pytest.raises(HttpError):
        await call(box.users().messages().get(userId="me", id=ids[1]))
    refused = sandbox.account(me).rate_limited  # type: ignore[union-attr]
    assert refused == 5

    async def allowed_again() -> bool:
        try:
            await call(box.users().messages().get(userId="me", id=ids[1]))
        except HttpError:
            return False
        return True

    await wait_until(allowed_again, 30)


async def test_pushes_above_one_a_second_per_user_are_dropped(google_server: SandboxServer) -> None:
    """Gmail push notifications guide (developers.google.com/workspace/gmail/api/guides/push,
    "Notification limitations"): "Each Gmail user being watched has a maximum notification
    rate of 1 event/sec. Any user notifications above that rate will be dropped." No final
    notification catches up: the client must not rely on every change being announced."""
    me = address()
    box = google_server.gmail(me)
    sandbox = google_server.google
    received: list[dict[str, Any]] = []
    original = (sandbox.push_sink, sandbox.merge_pushes, sandbox.push_min_interval)
    sandbox.push_sink = lambda endpoint, envelope: received.append(envelope)
    sandbox.push_endpoints["projects/p/topics/drop"] = "http://app.test/push"
    sandbox.merge_pushes, sandbox.push_min_interval = False, 1.0
    try:
        await call(box.users().watch(userId="me", body={"topicName": "projects/p/topics/drop"}))
        for i in range(3):
            await insert(box, raw_message("a@client.test", [me], f"Burst {i}"))
        await sandbox.drain_pushes()
        account = sandbox.account(me)
        assert account is not None
        assert len(received) == 1 and account.pushes_dropped == 2
        notice = json.loads(unb64url(received[0]["message"]["data"]))
        assert notice["historyId"] < account.history_id  # the later changes went unannounced
    finally:
        sandbox.push_sink, sandbox.merge_pushes, sandbox.push_min_interval = original


async def test_watch_needs_publish_rights_on_the_topic(google_server: SandboxServer) -> None:
    """Gmail push guide, "Grant publish rights on your topic": Gmail publishes as
    gmail-api-push@system.gserviceaccount.com, which needs the Pub/Sub Publisher role on the
    topic; without it `watch` fails with 403 (the sandbox: a topic in `unpublishable`)."""
    me = address()
    box = google_server.gmail(me)
    google_server.google.unpublishable.add("projects/p/topics/locked")
    try:
        with pytest.raises(HttpError) as refused:
            await call(
                box.users().watch(userId="me", body={"topicName": "projects/p/topics/locked"})
            )
    finally:
        google_server.google.unpublishable.discard("projects/p/topics/locked")
    assert refused.value.status_code == 403
    assert "projects/p/topics/locked" in json.loads(refused.value.content)["error"]["message"]
