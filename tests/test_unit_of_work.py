"""One unit of work ends every GraphQL operation, HTTP route and job: it commits and then
releases the buffered jobs and events, or rolls back and releases nothing."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from backend.kit.effects import AfterCommit
from backend.kit.errors import ErrorCode, ServiceError
from backend.mailboxes import connect
from backend.mailboxes.service import connect_mailbox
from backend.mailboxes.tables import Mailbox
from backend.providers.base import Provider
from backend.runtime import Runtime, Work
from backend.settings import Settings
from tests.conftest import REDIS_URL, LiveServer
from tests.event_stream import StreamReader
from tests.factories import Factory, Member, unique


async def _queued(runtime: Runtime) -> list[bytes]:
    return list(await runtime.redis.zrange("arq:queue", 0, -1))


async def _events_before_sentinel(
    runtime: Runtime, member: Member, listen: StreamReader
) -> list[Any]:
    """Every event published to the workspace before a sentinel we publish now: the stream
    keeps the order of publications, so no waiting is needed to know that nothing else came."""
    sentinel = {"type": "sentinel", "id": uuid.uuid4().hex}
    await runtime.publish(str(member.workspace.id), sentinel)
    seen = []
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        assert asyncio.get_running_loop().time() < deadline, "the sentinel never arrived"
        for event in await listen.read():
            if event == sentinel:
                return seen
            seen.append(event)


def _writes_then_fails(owner: Member, address: str) -> Any:
    async def finish(
        session: AsyncSession,
        effects: AfterCommit,
        settings: Settings,
        provider: Provider,
        code: str,
        state: str,
    ) -> Mailbox:
        await connect_mailbox(
            session,
            effects,
            settings.secret,
            owner=owner.user,
            provider=Provider.GMAIL,
            email_address=address,
            credentials={"refresh_token": "never stored"},
        )
        effects.publish(owner.workspace.id, {"type": "mailboxStatusChanged", "leaked": True})
        raise ServiceError(ErrorCode.ACCESS_DENIED, "Refused after writing.")

    return finish


async def test_a_route_that_fails_releases_nothing(
    api: LiveServer, runtime: Runtime, factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await factory.workspace()
    address = f"{unique('rolled-back-')}@crm.test"
    monkeypatch.setattr(connect, "finish", _writes_then_fails(owner, address))
    listen = await StreamReader(REDIS_URL, owner.workspace.id).start()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.get(
                f"{api.url}/oauth/google/callback", params={"code": "c", "state": "s"}
            )
        assert answer.status_code == 302
        assert "error=ACCESS_DENIED" in answer.headers["location"]
        async with runtime.db.sessionmaker() as session:
            stored = await session.scalars(select(Mailbox).where(Mailbox.email_address == address))
            assert stored.all() == []
        assert not [job for job in await _queued(runtime) if job.startswith(b"sync:")]
        assert await _events_before_sentinel(runtime, owner, listen) == []
    finally:
        await listen.aclose()


async def _connect(runtime: Runtime, work: Work, owner: Member, address: str) -> Mailbox:
    return await connect_mailbox(
        work.session,
        work.effects,
        runtime.settings.secret,
        owner=owner.user,
        provider=Provider.GMAIL,
        email_address=address,
        credentials={},
    )


async def test_a_unit_of_work_commits_then_releases_and_drops_everything_on_failure(
    runtime: Runtime, factory: Factory
) -> None:
    owner = await factory.workspace()
    kept, dropped = f"{unique('kept-')}@crm.test", f"{unique('dropped-')}@crm.test"
    listen = await StreamReader(REDIS_URL, owner.workspace.id).start()
    try:
        with pytest.raises(RuntimeError):
            async with runtime.unit_of_work() as work:
                await _connect(runtime, work, owner, dropped)
                work.effects.publish(owner.workspace.id, {"type": "dropped"})
                raise RuntimeError("a bug after the writes")
        assert await _queued(runtime) == []
        async with runtime.unit_of_work() as work:
            mailbox = await _connect(runtime, work, owner, kept)
            work.effects.publish(owner.workspace.id, {"type": "kept"})
        assert f"sync:{mailbox.id}".encode() in await _queued(runtime)
        assert await _events_before_sentinel(runtime, owner, listen) == [{"type": "kept"}]
        async with runtime.db.sessionmaker() as session:
            rows = await session.scalars(
                select(Mailbox.email_address).where(Mailbox.workspace_id == owner.workspace.id)
            )
            assert rows.all() == [kept]
    finally:
        await listen.aclose()
