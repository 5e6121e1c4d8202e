"""The timeline query's SQL is batched: its statement count is pinned and flat in page size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import event

from backend.graphql.relay import to_global_id
from backend.kit.clock import now
from tests.client import GQL
from tests.conftest import BACKEND, LiveServer
from tests.factories import Factory, raw_message

TIMELINE = """
query($id: ID!, $first: Int) {
  contact(id: $id) {
    name email
    timeline(first: $first) {
      totalCount
      pageInfo { hasNextPage endCursor }
      edges { cursor node {
        id subject snippet bodyHtml direction source sentAt deliveryStatus
        from { email name contact { name email } user { email } }
        to { email name contact { name } user { name } }
        cc { email contact { name } }
        thread { id subject emailCount lastEmailAt }
        mailbox { emailAddress owner { name } }
        sentBy { name }
        contacts { id name }
        attachments { filename size }
      } }
    }
  }
}
"""

# Auth 1, contact 1, timeline page 1, count (the contact's counter) 1, participants 1, own
# addresses 1 (their version; the addresses are cached), contacts by address 1, users 1,
# threads 1, thread subject visibility 1, mailboxes 1, timeline links 1, contacts by id 1,
# contact addresses 1; SQLite adds BEGIN for the auth and operation sessions.
EXPECTED_STATEMENTS = {"sqlite": 16, "postgresql": 14}[BACKEND]


@contextmanager
def counting(api: LiveServer) -> Iterator[list[str]]:
    statements: list[str] = []
    engine = api.app.state.runtime.db.engine.sync_engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def test_timeline_statement_count_is_pinned_and_flat(
    gql: GQL, factory: Factory, api: LiveServer
) -> None:
    owner = await factory.workspace()
    teammate = await factory.member(owner)
    mailbox = await factory.mailbox(owner)
    contact = await factory.contact(owner, "pat@bigclient.test", "Pat")
    colleague = await factory.contact(owner, "quinn@bigclient.test", "Quinn")
    start = now() + timedelta(minutes=1)
    for i in range(25):
        await factory.email(
            owner,
            mailbox,
            raw_message(
                "Pat <pat@bigclient.test>",
                [owner.email, f"other{i}@elsewhere.test"],
                f"Message {i}",
                cc=[teammate.email, "quinn@bigclient.test"],
                date=start + timedelta(minutes=i),
                html=f"<p>Body {i}</p>",
            ),
        )
    counts = {}
    # The first read of a workspace fills the own-addresses cache.
    await gql(TIMELINE, {"id": to_global_id("Contact", contact.id), "first": 1}, token=owner.token)
    for first in (5, 20):
        with counting(api) as statements:
            data = await gql(
                TIMELINE,
                {"id": to_global_id("Contact", contact.id), "first": first},
                token=owner.token,
            )
        edges = data["contact"]["timeline"]["edges"]
        assert len(edges) == first
        assert edges[0]["node"]["from"]["contact"] == {"name": "Pat", "email": "pat@bigclient.test"}
        assert {c["name"] for c in edges[0]["node"]["contacts"]} == {"Pat", "Quinn"}
        assert edges[0]["node"]["cc"][0]["contact"] is None  # a user is never a contact (R1)
        counts[first] = len(statements)
    assert colleague.id
    assert counts[5] == counts[20], counts
    assert counts[20] == EXPECTED_STATEMENTS, counts
