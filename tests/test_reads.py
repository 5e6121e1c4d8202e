"""Timeline reads that cost the same however much mail there is: the contact's timeline
counter, the cached own addresses, the shared validation cache."""

from __future__ import annotations

import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import col, select

from backend.api.schema import build_schema
from backend.auth.tables import Role
from backend.contacts.tables import Contact
from backend.exclusions import service as exclusions_service
from backend.graphql.relay import to_global_id
from backend.kit.clock import now
from backend.kit.effects import AfterCommit
from backend.mail import service as mail_service
from backend.mail.tables import TimelineEntry
from backend.mailboxes import queries as mailbox_queries
from backend.mailboxes.tables import Mailbox
from backend.runtime import Runtime
from backend.settings import Settings
from backend.timeline import service as timeline_service
from backend.workspaces import service as workspaces_service
from tests.client import GQL
from tests.factories import Factory, Member, raw_message

TOTAL = "query($id: ID!) { contact(id: $id) { timeline(first: 1) { totalCount } } }"


async def _real_count(runtime: Runtime, contact_id: uuid.UUID) -> int:
    async with runtime.db.sessionmaker() as session:
        total = await session.scalar(
            select(sa.func.count())
            .select_from(TimelineEntry)
            .where(TimelineEntry.contact_id == contact_id)
        )
    return int(total or 0)


async def _assert_counted(gql: GQL, runtime: Runtime, owner: Member, contact: Contact) -> int:
    data = await gql(TOTAL, {"id": to_global_id("Contact", contact.id)}, token=owner.token)
    total = data["contact"]["timeline"]["totalCount"]
    assert total == await _real_count(runtime, contact.id)
    return int(total)


async def test_timeline_total_count_follows_filing_moving_deleting_and_exclusions(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    pat = await factory.contact(owner, "pat@counted.test", "Pat")
    quinn = await factory.contact(owner, "quinn@counted.test", "Quinn")
    start = now() + timedelta(minutes=1)
    emails = [
        await factory.email(
            owner,
            mailbox,
            raw_message(
                "Pat <pat@counted.test>",
                [owner.email],
                f"Counted {i}",
                cc=["quinn@counted.test"] if i == 0 else None,
                date=start + timedelta(minutes=i),
            ),
        )
        for i in range(4)
    ]
    # Filed by ingest: four on Pat's timeline, one on Quinn's.
    assert await _assert_counted(gql, runtime, owner, pat) == 4
    assert await _assert_counted(gql, runtime, owner, quinn) == 1

    async with runtime.db.transaction() as session:  # filed by hand
        await timeline_service.file_email(
            session, owner.viewer, AfterCommit(), emails[1].id, quinn.id
        )
    assert await _assert_counted(gql, runtime, owner, quinn) == 2

    async with runtime.db.transaction() as session:  # moved
        await timeline_service.move_email(
            session, owner.viewer, AfterCommit(), emails[2].id, pat.id, quinn.id
        )
    assert await _assert_counted(gql, runtime, owner, pat) == 3
    assert await _assert_counted(gql, runtime, owner, quinn) == 3

    async with runtime.db.transaction() as session:  # deleted from the CRM
        await timeline_service.delete_email(session, owner.viewer, emails[3].id)
    assert await _assert_counted(gql, runtime, owner, pat) == 2

    async with runtime.db.transaction() as session:  # R4 exclusion purging past mail
        await exclusions_service.add_exclusion(
            session, owner.viewer, "quinn@counted.test", purge_existing=True
        )
    # Only the mail R4 would now skip goes (Quinn's cc-only copy), not what was filed by hand.
    assert await _assert_counted(gql, runtime, owner, quinn) == 2
    assert await _assert_counted(gql, runtime, owner, pat) == 2

    async with runtime.db.transaction() as session:  # the mailbox's history erased
        await mail_service.erase_mailbox_history(session, mailbox.id)
    assert await _assert_counted(gql, runtime, owner, pat) == 0


async def test_own_addresses_cache_is_invalidated_when_mailboxes_or_users_change(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    workspace_id = owner.workspace.id

    async def cached() -> dict[str, uuid.UUID]:
        async with runtime.db.sessionmaker() as session:
            return dict(await mailbox_queries.cached_own_addresses(session, workspace_id))

    assert set(await cached()) == {owner.email}
    mailbox = await factory.mailbox(owner, "sales@owned.test")
    assert await cached() == {owner.email: owner.user.id, "sales@owned.test": owner.user.id}

    async with runtime.db.transaction() as session:  # an alias appears
        box = await session.get(Mailbox, mailbox.id)
        assert box is not None
        box.aliases = ["alias@owned.test"]
        session.add(box)
    assert "alias@owned.test" in await cached()

    async with runtime.db.transaction() as session:  # a sync pass's bookkeeping changes nothing
        box = await session.get(Mailbox, mailbox.id)
        assert box is not None
        box.last_synced_at = now()
        session.add(box)
    assert "alias@owned.test" in await cached()

    teammate = await factory.member(owner)  # an identity is added
    assert (await cached())[teammate.email] == teammate.user.id

    async with runtime.db.transaction() as session:  # a mailbox is removed
        await session.execute(sa.delete(Mailbox).where(col(Mailbox.id) == mailbox.id))
    assert set(await cached()) == {owner.email, teammate.email}

    async with runtime.db.transaction() as session:  # a workspace added alongside stays apart
        await workspaces_service.add_user(
            session, owner.workspace, "admin@owned.test", Role.ADMIN, "Admin"
        )
    assert "admin@owned.test" in await cached()


async def test_participant_contact_sees_a_new_mailbox_address_at_once(
    gql: GQL, factory: Factory, runtime: Runtime
) -> None:
    """R1 through the API's cache: once an address becomes a user's, it is no contact."""
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "pat@r1cache.test", "Pat")
    await factory.contact(owner, "shared@r1cache.test", "Shared")
    await factory.email(
        owner,
        mailbox,
        raw_message("Pat <pat@r1cache.test>", [owner.email], cc=["shared@r1cache.test"]),
    )
    query = """query($id: ID!) { contact(id: $id) { timeline { edges { node {
        cc { email contact { name } } } } } } }"""
    variables = {"id": to_global_id("Contact", contact.id)}

    def cc(data: dict[str, object]) -> object:
        return data["contact"]["timeline"]["edges"][0]["node"]["cc"]  # type: ignore[index]

    assert cc(await gql(query, variables, token=owner.token)) == [
        {"email": "shared@r1cache.test", "contact": {"name": "Shared"}}
    ]
    await factory.mailbox(owner, "shared@r1cache.test")
    assert cc(await gql(query, variables, token=owner.token)) == [
        {"email": "shared@r1cache.test", "contact": None}
    ]


async def test_validation_cache_hits_with_the_same_rule_classes(
    settings: Settings, factory: Factory, runtime: Runtime
) -> None:
    from strawberry.extensions.validation_cache import _get_validate_cache

    from backend.graphql.context import Context

    schema = build_schema(settings)
    owner = await factory.workspace()
    query = "{ viewer { user { email } } }"
    cached = _get_validate_cache(512)
    results = []
    for _ in range(3):
        before = cached.cache_info()
        result = await schema.execute(query, context_value=Context(runtime, owner.viewer))
        assert result.errors is None, result.errors
        results.append(cached.cache_info().hits - before.hits)
    # The first run may validate; every later one is a hit, because the limiter's rule class
    # is built once with the schema, not per request.
    assert results[1:] == [1, 1], results
    assert build_schema(settings) is not schema
