"""Filing and PostgreSQL's row locks: timeline entries lock their contacts (the
timeline_count trigger) in one order in every batch, and a batch that PostgreSQL aborts as a
deadlock's victim runs again, or fails the pass, never its messages (no IMPORT_FAILED)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from backend.auth.tables import Workspace
from backend.contacts.tables import Contact
from backend.db import DEADLOCK_SQLSTATE, is_deadlock
from backend.kit.effects import AfterCommit
from backend.mailboxes.tables import Mailbox, SyncErrorEntry
from backend.providers.base import FetchedMessage, MessageRef
from backend.runtime import Runtime
from backend.sync import ingest, service
from backend.sync.ingest import Outcome, filing_context
from backend.sync.parsing import parse_message
from tests.factories import Factory, Member, raw_message


class _DeadlockVictim(Exception):
    """What the driver raises for a statement PostgreSQL aborted to break a lock cycle."""

    sqlstate = DEADLOCK_SQLSTATE


@contextmanager
def _timeline_inserts(runtime: Runtime, deadlocks: int = 0) -> Iterator[list[list[dict[str, Any]]]]:
    """The rows of each timeline INSERT, in the order sent; the first `deadlocks` of them
    fail as a deadlock's victim would."""
    seen: list[list[dict[str, Any]]] = []
    engine = runtime.db.engine.sync_engine

    def before(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
        if not isinstance(clause, sa.Insert) or clause.table.name != "timeline_entries":
            return
        rows = multiparams[0] if multiparams and isinstance(multiparams[0], list) else multiparams
        seen.append([dict(r) for r in rows])
        if len(seen) <= deadlocks:
            raise OperationalError(str(clause), None, _DeadlockVictim("deadlock detected"))

    event.listen(engine, "before_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_execute", before)


async def _contacts(factory: Factory, owner: Member, count: int) -> list[tuple[Contact, str]]:
    """Contacts and their addresses, in the reverse of the lock order, so that an insert in
    the order of a message's recipients would show."""
    made: list[tuple[Contact, str]] = []
    for _ in range(count):
        address = f"{uuid.uuid4().hex[:12]}@locks.test"
        made.append((await factory.contact(owner, address), address))
    return sorted(made, key=lambda pair: pair[0].id, reverse=True)


async def test_timeline_entries_lock_their_contacts_in_contact_order(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contacts = await _contacts(factory, owner, 4)
    with _timeline_inserts(runtime) as inserts:
        result = await factory.ingest(
            mailbox, raw_message(owner.email, [a for _, a in contacts], "To all four")
        )
    assert result.outcome == Outcome.FILED
    (rows,) = inserts
    ids = [row["contact_id"] for row in rows]
    assert sorted(ids) == ids and set(ids) == {c.id for c, _ in contacts}


async def test_a_batch_aborted_as_a_deadlock_victim_runs_again(
    factory: Factory, runtime: Runtime
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    contacts = await _contacts(factory, owner, 2)
    with _timeline_inserts(runtime, deadlocks=1) as inserts:
        result = await factory.ingest(
            mailbox, raw_message(owner.email, [a for _, a in contacts], "Retried")
        )
    assert result.outcome == Outcome.FILED and len(inserts) == 2
    async with runtime.db.sessionmaker() as session:
        counts = (
            await session.execute(
                select(Contact.timeline_count).where(
                    col(Contact.id).in_([c.id for c, _ in contacts])
                )
            )
        ).scalars()
        assert list(counts) == [1, 1]  # the aborted attempt left nothing behind


async def test_a_persistent_deadlock_fails_the_batch_not_its_messages(
    factory: Factory, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    mailbox = await factory.mailbox(owner)
    ((_, address),) = await _contacts(factory, owner, 1)
    raws = [raw_message(owner.email, [address], f"Stuck {n}") for n in range(2)]
    with _timeline_inserts(runtime, deadlocks=1000) as inserts:
        async with runtime.db.transaction() as session:
            box = await session.get(Mailbox, mailbox.id)
            workspace = await session.get(Workspace, owner.workspace.id)
            assert box is not None and workspace is not None
            ctx = await filing_context(session, workspace, box)
            batch = [
                (
                    FetchedMessage(ref=MessageRef(uuid.uuid4().hex, None), raw=raw),
                    parse_message(raw),
                )
                for raw in raws
            ]
            with pytest.raises(OperationalError) as failure:
                await service._file_parsed(session, AfterCommit(), workspace, box, ctx, batch)
            assert is_deadlock(failure.value)
            recorded = await session.scalar(
                select(sa.func.count())
                .select_from(SyncErrorEntry)
                .where(col(SyncErrorEntry.mailbox_id) == mailbox.id)
            )
    assert len(inserts) == ingest.DEADLOCK_ATTEMPTS  # the whole batch, never one by one
    assert recorded == 0  # no IMPORT_FAILED: the pass fails, and files them next time
