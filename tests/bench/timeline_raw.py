"""The timeline bench's baseline: a bare Starlette endpoint answering the contact timeline
page with the statements the product runs (Core, no ORM, no GraphQL), serialised as JSON.

    uvicorn tests.bench.timeline_raw:create_raw_app --factory   (reads MAILSYNC_DATABASE_URL,
    MAILSYNC_SECRET_KEY)
"""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backend.auth.tables import ApiToken, User, Workspace
from backend.auth.tokens import decode_token
from backend.contacts.tables import Contact, ContactAddress
from backend.db import create_engine, table_of
from backend.graphql.relay import to_global_id
from backend.kit.pagination import encode_cursor
from backend.mail.tables import Email, Participant, Thread, TimelineEntry
from backend.mailboxes.tables import Mailbox
from backend.settings import Settings

tokens, users, workspaces = table_of(ApiToken), table_of(User), table_of(Workspace)
contacts, addresses = table_of(Contact), table_of(ContactAddress)
emails, participants, threads = table_of(Email), table_of(Participant), table_of(Thread)
entries, mailboxes = table_of(TimelineEntry), table_of(Mailbox)


def _person(row: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"email": row.address, "name": row.name, **(extra or {})}


def create_raw_app() -> Starlette:
    settings = Settings()
    engine = create_engine(os.environ["MAILSYNC_DATABASE_URL"])
    secret = settings.secret

    async def timeline(request: Request) -> Response:
        body = await request.json()
        claims = decode_token(secret, request.headers["authorization"].removeprefix("Bearer "))
        if claims is None:
            return JSONResponse({"error": "unauthenticated"}, status_code=401)
        contact_id = uuid.UUID(body["variables"]["contact"])
        first = int(body["variables"]["first"])
        async with engine.connect() as conn:
            viewer = (
                await conn.execute(
                    sa.select(users, workspaces.c.addresses_version)
                    .join(tokens, tokens.c.user_id == users.c.id)
                    .join(workspaces, workspaces.c.id == users.c.workspace_id)
                    .where(tokens.c.id == claims.token_id, tokens.c.revoked_at.is_(None))
                )
            ).one()
            contact = (
                await conn.execute(
                    sa.select(contacts).where(
                        contacts.c.id == contact_id, contacts.c.workspace_id == viewer.workspace_id
                    )
                )
            ).one()
            main = await conn.scalar(
                sa.select(addresses.c.address)
                .where(addresses.c.contact_id == contact_id)
                .order_by(addresses.c.position)
                .limit(1)
            )
            page = (
                await conn.execute(
                    sa.select(emails)
                    .join(entries, entries.c.email_id == emails.c.id)
                    .where(entries.c.contact_id == contact_id)
                    .order_by(entries.c.sent_at.desc(), entries.c.email_id.desc())
                    .limit(first + 1)
                )
            ).all()
            rows = page[:first]
            ids = [e.id for e in rows]
            total = await conn.scalar(
                sa.select(contacts.c.timeline_count).where(contacts.c.id == contact_id)
            )
            people: dict[uuid.UUID, list[Any]] = defaultdict(list)
            for p in await conn.execute(
                sa.select(participants)
                .where(participants.c.email_id.in_(ids))
                .order_by(participants.c.email_id, participants.c.position)
            ):
                people[p.email_id].append(p)
            own = {
                u.email: u
                for u in await conn.execute(
                    sa.select(users).where(users.c.workspace_id == viewer.workspace_id)
                )
            }
            known = {a for ps in people.values() for p in ps for a in [p.address] if a not in own}
            by_address = {
                r.address: r
                for r in await conn.execute(
                    sa.select(addresses.c.address, contacts.c.name)
                    .join(contacts, contacts.c.id == addresses.c.contact_id)
                    .where(
                        addresses.c.workspace_id == viewer.workspace_id,
                        addresses.c.address.in_(known),
                    )
                )
            }
            thread_rows = {
                t.id: t
                for t in await conn.execute(
                    sa.select(threads).where(threads.c.id.in_({e.thread_id for e in rows}))
                )
            }
            await conn.execute(
                sa.select(emails.c.thread_id, mailboxes.c.visibility, mailboxes.c.owner_id)
                .outerjoin(mailboxes, mailboxes.c.id == emails.c.mailbox_id)
                .where(emails.c.thread_id.in_(list(thread_rows)))
            )
            box_rows = {
                m.id: m
                for m in await conn.execute(
                    sa.select(mailboxes).where(mailboxes.c.id.in_({e.mailbox_id for e in rows}))
                )
            }
            filed: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
            for link in await conn.execute(
                sa.select(entries.c.email_id, entries.c.contact_id)
                .where(entries.c.email_id.in_(ids))
                .order_by(entries.c.filed_at, entries.c.contact_id)
            ):
                filed[link.email_id].append(link.contact_id)
            named = {
                c.id: c
                for c in await conn.execute(
                    sa.select(contacts.c.id, contacts.c.name).where(
                        contacts.c.id.in_({c for cs in filed.values() for c in cs})
                    )
                )
            }
            await conn.execute(sa.select(addresses).where(addresses.c.contact_id.in_(list(named))))

        def person(p: Any) -> dict[str, Any]:
            match = by_address.get(p.address)
            user = own.get(p.address)
            return _person(
                p,
                {
                    "contact": {"name": match.name, "email": match.address} if match else None,
                    "user": {"email": user.email, "name": user.name} if user else None,
                },
            )

        edges = []
        for e in rows:
            ps = people[e.id]
            thread = thread_rows[e.thread_id]
            box = box_rows.get(e.mailbox_id)
            edges.append(
                {
                    "cursor": encode_cursor((e.sent_at, e.id)),
                    "node": {
                        "id": to_global_id("Email", e.id),
                        "subject": e.subject,
                        "snippet": e.snippet,
                        "bodyHtml": e.body_html,
                        "direction": e.direction,
                        "source": e.source,
                        "sentAt": e.sent_at.isoformat(),
                        "deliveryStatus": e.delivery_status,
                        "from": next((person(p) for p in ps if p.role == "FROM"), None),
                        "to": [person(p) for p in ps if p.role == "TO"],
                        "cc": [person(p) for p in ps if p.role == "CC"],
                        "thread": {
                            "id": to_global_id("Thread", thread.id),
                            "subject": thread.subject,
                            "emailCount": thread.email_count,
                            "lastEmailAt": thread.last_email_at.isoformat(),
                        },
                        "mailbox": {"emailAddress": box.email_address} if box else None,
                        "sentBy": {"name": viewer.name},
                        "contacts": [
                            {"id": to_global_id("Contact", c), "name": named[c].name}
                            for c in filed[e.id]
                        ],
                        "attachments": [
                            {"filename": a.get("filename"), "size": a.get("size")}
                            for a in e.attachments
                        ],
                    },
                }
            )
        return JSONResponse(
            {
                "data": {
                    "contact": {
                        "name": contact.name,
                        "email": main,
                        "timeline": {
                            "totalCount": total,
                            "pageInfo": {
                                "hasNextPage": len(page) > first,
                                "endCursor": edges[-1]["cursor"] if edges else None,
                            },
                            "edges": edges,
                        },
                    }
                }
            }
        )

    return Starlette(routes=[Route("/timeline", timeline, methods=["POST"])])
