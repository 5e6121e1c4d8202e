"""Live events end to end: a worker job files mail; websocket subscribers see it, tenants apart."""

from __future__ import annotations

from backend.runtime import Runtime
from tests.client import GQL, LEGACY_WS, TRANSPORT_WS, subscribe
from tests.conftest import LiveServer
from tests.factories import Factory, raw_message
from tests.providers import fake_provider
from tests.sync_helpers import wait_until
from tests.worker import drain

EMAIL_RECEIVED = """
subscription($contactId: ID) {
  emailReceived(contactId: $contactId) {
    email { id subject direction snippet from { email contact { name } } to { email } sentBy { email } }
    contacts { id name }
  }
}
"""


async def test_worker_job_files_mail_and_subscribers_of_that_workspace_only_get_the_event(
    api: LiveServer, factory: Factory, runtime: Runtime, gql: GQL
) -> None:
    owner = await factory.workspace()
    stranger = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "ann@client.test", "Ann Client")
    with fake_provider() as store:
        store.deliver(
            mailbox.email_address,
            raw_message("Ann Client <ann@client.test>", [owner.email], "Quote", "Numbers inside"),
        )
        async with (
            subscribe(
                api.ws_url,
                owner.token,
                EMAIL_RECEIVED,
                subscribers=api.subscribers(owner.workspace.id),
            ) as mine,
            subscribe(
                api.ws_url,
                stranger.token,
                EMAIL_RECEIVED,
                subscribers=api.subscribers(stranger.workspace.id),
            ) as theirs,
        ):
            await gql(
                "mutation($id: ID!) { syncMailbox(id: $id) { mailbox { id } userErrors { code } } }",
                {"id": _gid("Mailbox", mailbox.id)},
                token=owner.token,
            )
            assert await drain(runtime) >= 1
            event = (await mine.next())["data"]["emailReceived"]
            await theirs.nothing_within(1.0)
    assert event["email"]["subject"] == "Quote"
    assert event["email"]["direction"] == "INCOMING"
    assert event["email"]["snippet"] == "Numbers inside"
    assert event["email"]["from"] == {"email": "ann@client.test", "contact": {"name": "Ann Client"}}
    assert event["email"]["sentBy"] == {"email": owner.email}
    assert event["contacts"] == [{"id": _gid("Contact", contact.id), "name": "Ann Client"}]
    timeline = await gql(
        "query($id: ID!) { contact(id: $id) { timeline { totalCount edges { node { subject } } } } }",
        {"id": _gid("Contact", contact.id)},
        token=owner.token,
    )
    assert timeline["contact"]["timeline"]["totalCount"] == 1


async def test_subscription_filters_by_contact(
    api: LiveServer, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    ann = await factory.contact(owner, "ann@one.test", "Ann")
    await factory.contact(owner, "bob@two.test", "Bob")
    async with subscribe(
        api.ws_url,
        owner.token,
        EMAIL_RECEIVED,
        {"contactId": _gid("Contact", ann.id)},
        subscribers=api.subscribers(owner.workspace.id),
    ) as sub:
        await factory.email(owner, mailbox, raw_message("bob@two.test", [owner.email], "From Bob"))
        await factory.email(owner, mailbox, raw_message("ann@one.test", [owner.email], "From Ann"))
        event = (await sub.next())["data"]["emailReceived"]
        assert event["email"]["subject"] == "From Ann"
        await sub.nothing_within(0.5)


async def test_legacy_graphql_ws_protocol_delivers_events(
    api: LiveServer, factory: Factory
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "carol@three.test", "Carol")
    async with subscribe(
        api.ws_url,
        owner.token,
        EMAIL_RECEIVED,
        protocol=LEGACY_WS,
        subscribers=api.subscribers(owner.workspace.id),
    ) as sub:
        assert sub.protocol == LEGACY_WS
        await factory.email(
            owner, mailbox, raw_message("carol@three.test", [owner.email], "Legacy")
        )
        event = (await sub.next())["data"]["emailReceived"]
    assert event["email"]["subject"] == "Legacy"


async def test_client_offering_the_legacy_protocol_first_gets_queries_and_mutations_answered(
    api: LiveServer, factory: Factory
) -> None:
    from tests.client import start, ws_connect

    owner = await factory.workspace()
    async with ws_connect(api.ws_url, owner.token, [LEGACY_WS, TRANSPORT_WS]) as (ws, protocol):
        query = await start(ws, protocol, "q", "{ viewer { user { email } } }")
        assert (await query.next())["data"]["viewer"]["user"]["email"] == owner.email
        mutation = await start(
            ws,
            protocol,
            "m",
            'mutation { createContact(input: {email: "ws@client.test"}) { contact { email } userErrors { code } } }',
        )
        created = (await mutation.next())["data"]["createContact"]
        again = await start(ws, protocol, "q2", '{ contacts(search: "ws@client") { totalCount } }')
        stored = (await again.next())["data"]["contacts"]["totalCount"]
    assert created == {"contact": {"email": "ws@client.test"}, "userErrors": []}
    assert stored == 1  # the mutation committed


async def test_mailbox_status_and_pass_events(
    api: LiveServer, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    await factory.contact(owner, "dan@four.test", "Dan")
    status_sub = "subscription { mailboxStatusChanged { mailbox { status } previousStatus } }"
    pass_sub = (
        "subscription { syncPassCompleted { mailbox { emailAddress lastSyncedAt } filed failed } }"
    )
    with fake_provider() as store:
        store.deliver(mailbox.email_address, raw_message("dan@four.test", [owner.email], "Hi"))
        async with (
            subscribe(
                api.ws_url, owner.token, status_sub, subscribers=api.subscribers(owner.workspace.id)
            ) as statuses,
            subscribe(
                api.ws_url, owner.token, pass_sub, subscribers=api.subscribers(owner.workspace.id)
            ) as passes,
        ):
            await runtime.jobs.enqueue_sync(str(mailbox.id))
            await drain(runtime)
            changed = (await statuses.next())["data"]["mailboxStatusChanged"]
            finished = (await passes.next())["data"]["syncPassCompleted"]
    assert changed == {"mailbox": {"status": "ACTIVE"}, "previousStatus": "PENDING"}
    assert finished["filed"] == 1 and finished["failed"] == 0
    assert finished["mailbox"]["lastSyncedAt"] is not None


def _gid(kind: str, row_id: object) -> str:
    from backend.graphql.relay import to_global_id

    return str(to_global_id(kind, row_id))  # type: ignore[arg-type]


async def test_hub_keeps_one_redis_subscription_for_many_clients(
    api: LiveServer, factory: Factory
) -> None:
    owner = await factory.workspace()
    hub = api.app.state.runtime.hub
    redis = api.app.state.runtime.redis
    before = hub.subscriber_count

    async def stream_readers() -> int:
        db = redis.connection_pool.connection_kwargs.get("db", 0)
        clients = await redis.client_list()
        return sum(1 for c in clients if c["cmd"] == "xread" and int(c["db"]) == db)

    readers = await stream_readers()
    assert readers >= 1
    async with (
        subscribe(
            api.ws_url, owner.token, EMAIL_RECEIVED, subscribers=api.subscribers(owner.workspace.id)
        ) as _a,
        subscribe(
            api.ws_url, owner.token, EMAIL_RECEIVED, subscribers=api.subscribers(owner.workspace.id)
        ) as _b,
        subscribe(
            api.ws_url, owner.token, EMAIL_RECEIVED, subscribers=api.subscribers(owner.workspace.id)
        ) as _c,
    ):
        assert hub.subscriber_count == before + 3
        assert await stream_readers() == readers  # one reader per process, not per subscriber

    async def unregistered() -> bool:  # the server notices the closed sockets on its own time
        return bool(hub.subscriber_count == before)

    await wait_until(unregistered, 30)
