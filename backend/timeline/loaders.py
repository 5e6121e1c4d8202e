"""Per-operation loaders of emails, threads and their participants."""

from __future__ import annotations

import uuid

from strawberry.dataloader import DataLoader

from backend.graphql.loaders import LoaderScope, batch, loader
from backend.mail.tables import Email, Thread
from backend.timeline import queries


@loader
def thread(scope: LoaderScope) -> DataLoader[uuid.UUID, Thread | None]:
    return batch(lambda ids: queries.threads_by_ids(scope.session, scope.workspace_id, ids))


@loader
def email(scope: LoaderScope) -> DataLoader[uuid.UUID, Email | None]:
    return batch(lambda ids: queries.emails_by_ids(scope.session, scope.workspace_id, ids))


@loader
def participants(scope: LoaderScope) -> DataLoader[uuid.UUID, list[queries.ParticipantRecord]]:
    return batch(lambda ids: queries.participants_by_email(scope.session, ids), list)


@loader
def email_contact_ids(scope: LoaderScope) -> DataLoader[uuid.UUID, list[uuid.UUID]]:
    return batch(lambda ids: queries.contact_ids_by_email(scope.session, ids), list)


@loader
def thread_email_ids(scope: LoaderScope) -> DataLoader[uuid.UUID, list[uuid.UUID]]:
    return batch(lambda ids: queries.thread_email_ids(scope.session, ids), list)


@loader
def thread_subject_viewers(
    scope: LoaderScope,
) -> DataLoader[uuid.UUID, list[tuple[str | None, uuid.UUID | None]]]:
    return batch(lambda ids: queries.thread_subject_viewers(scope.session, ids), list)


@loader
def timeline_count(scope: LoaderScope) -> DataLoader[uuid.UUID, int]:
    return batch(lambda ids: queries.timeline_counts(scope.session, ids), int)
