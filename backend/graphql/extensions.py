"""The GraphQL edge's unit of work: one session per operation, committed only on success,
with jobs and events released after the commit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from backend.db import read_only
from backend.graphql.context import Context, current_scope
from backend.kit.errors import ServiceError

if TYPE_CHECKING:
    from backend.runtime import Work

log = logging.getLogger(__name__)

READ_ONLY_TYPES = {OperationType.QUERY, OperationType.SUBSCRIPTION}


def is_unexpected(error: GraphQLError) -> bool:
    """Errors we raise on purpose (auth, validation, bad arguments) pass; the rest is masked."""
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError | ServiceError)


UNEXPECTED_MESSAGE = "Unexpected error."


def masked(error: GraphQLError) -> GraphQLError:
    """What a client sees of an unexpected error (the MaskErrors extension's message)."""
    return GraphQLError(
        UNEXPECTED_MESSAGE,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        original_error=None,
    )


class ExpectedErrors(SchemaExtension):
    """Bad query arguments (a malformed cursor, say) are the client's to fix: give them a code."""

    async def on_operation(self) -> AsyncIterator[None]:
        yield
        result = self.execution_context.result
        for error in getattr(result, "errors", None) or []:
            original = error.original_error
            if isinstance(original, ServiceError):
                error.extensions = {
                    "code": original.code,
                    **({"field": original.field} if original.field else {}),
                }


class UnitOfWork(SchemaExtension):
    _work: Work | None = None

    async def on_execute(self) -> AsyncIterator[None]:
        # Parsed by now and no statement run yet: queries and subscriptions only read, so on
        # SQLite they never take (or wait for) the write lock.
        if self._work is not None and _operation_type(self.execution_context) in READ_ONLY_TYPES:
            read_only(self._work.session)
        yield

    async def on_operation(self) -> AsyncIterator[None]:
        execution = self.execution_context
        context = execution.context
        if not isinstance(context, Context):
            yield
            return
        # The session connects on first use, so subscriptions (which resolve each event in a
        # scope of its own, see api/subscriptions.py) hold no connection through this one.
        async with context.runtime.unit_of_work() as work:
            self._work = work
            scope = context.open_scope(work)
            token = current_scope.set(scope)
            try:
                yield
                result = execution.result
                # A mutation commits unless one of its fields failed (any error on a root
                # field, such as a ServiceError escaping `attempt`, FORBIDDEN, or a bug) or an
                # unexpected error happened anywhere. A client's bad argument deeper in the
                # payload (a malformed cursor) does not undo what the mutation did.
                errors = getattr(result, "errors", None) or []
                failed = result is None or any(
                    is_unexpected(e) or (e.path is not None and len(e.path) <= 1) for e in errors
                )
                if _operation_type(execution) != OperationType.MUTATION or failed:
                    work.discard()
            except BaseException:
                work.discard()
                raise
            finally:
                try:
                    current_scope.reset(token)
                except ValueError:
                    current_scope.set(None)


def _operation_type(execution: object) -> OperationType | None:
    try:
        return getattr(execution, "operation_type", None)
    except RuntimeError:  # the document never parsed
        return None
