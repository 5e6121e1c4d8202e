"""The public schema, assembled from each domain's queries and mutations."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import AddValidationRules, MaskErrors, ValidationCache
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.graphql import OperationType

from backend.api.subscriptions import Subscription
from backend.auth import loaders as auth_loaders
from backend.contacts import loaders as contact_loaders
from backend.contacts.resolvers import ContactMutation, ContactQuery
from backend.contacts.types import Contact
from backend.exclusions.resolvers import ExclusionMutation, ExclusionQuery
from backend.exclusions.service import visible_exclusion
from backend.exclusions.types import Exclusion
from backend.graphql.context import Info
from backend.graphql.errors import require_viewer
from backend.graphql.extensions import ExpectedErrors, UnitOfWork, is_unexpected, masked
from backend.graphql.limits import DocumentLimits, LimitedParser, cost_rule
from backend.graphql.relay import Node, parse_global_id
from backend.mailboxes import loaders as mailbox_loaders
from backend.mailboxes.access import can_manage
from backend.mailboxes.resolvers import MailboxMutation, MailboxQuery
from backend.mailboxes.types import Mailbox
from backend.sending.resolvers import SendMutation
from backend.settings import Settings, get_settings
from backend.timeline import loaders as timeline_loaders
from backend.timeline.resolvers import MailMutation, MailQuery
from backend.timeline.types import Email, Thread
from backend.workspaces.resolvers import WorkspaceMutation, WorkspaceQuery
from backend.workspaces.types import User, Workspace


@strawberry.type
class NodeQuery:
    @strawberry.field(description="Any object by its global id; another workspace's is null.")
    async def node(self, info: Info, id: strawberry.ID) -> Node | None:
        viewer = require_viewer(info)
        parsed = parse_global_id(id)
        if parsed is None:
            return None
        kind, row_id = parsed
        if kind == "User":
            user = await auth_loaders.user(info).load(row_id)
            return User(row=user) if user else None
        if kind == "Workspace":
            return Workspace(row=viewer.workspace) if row_id == viewer.workspace_id else None
        if kind == "Contact":
            contact = await contact_loaders.contact(info).load(row_id)
            return Contact(row=contact) if contact else None
        if kind == "Email":
            email = await timeline_loaders.email(info).load(row_id)
            return Email(row=email) if email else None
        if kind == "Thread":
            thread = await timeline_loaders.thread(info).load(row_id)
            return Thread(row=thread) if thread else None
        if kind == "Mailbox":
            mailbox = await mailbox_loaders.mailbox(info).load(row_id)
            return Mailbox(row=mailbox) if mailbox and can_manage(viewer, mailbox) else None
        if kind == "Exclusion":
            exclusion = await visible_exclusion(info.context.session, viewer, row_id)
            return Exclusion(row=exclusion) if exclusion else None
        return None


Query = merge_types(
    "Query", (NodeQuery, WorkspaceQuery, ContactQuery, MailQuery, MailboxQuery, ExclusionQuery)
)
Mutation = merge_types(
    "Mutation",
    (
        ContactMutation,
        MailboxMutation,
        MailMutation,
        SendMutation,
        ExclusionMutation,
        WorkspaceMutation,
    ),
)


class MailsyncSchema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Log what went wrong on our side; a client's bad query or token is not our error."""
        unexpected = [e for e in errors if is_unexpected(e)]
        if unexpected:
            super().process_errors(unexpected, execution_context)

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Any = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Mask what the MaskErrors extension could not: an error raised after it ran, such as
        one from the unit of work's rollback, whatever order the extensions run in."""
        result = await super().execute(
            query,
            variable_values=variable_values,
            context_value=context_value,
            root_value=root_value,
            operation_name=operation_name,
            allowed_operation_types=allowed_operation_types,
            operation_extensions=operation_extensions,
        )
        if result.errors:
            result.errors = [masked(e) if is_unexpected(e) else e for e in result.errors]
        return result

    async def subscribe(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> Any:
        """Only the legacy graphql-ws handler calls this, and that protocol's `start` carries
        queries and mutations as well as subscriptions: answer all three."""
        return await self.stream(
            query=query,
            variable_values=variable_values,
            context_value=context_value,
            root_value=root_value,
            operation_name=operation_name,
            operation_extensions=operation_extensions,
            allowed_operation_types=(
                OperationType.QUERY,
                OperationType.MUTATION,
                OperationType.SUBSCRIPTION,
            ),
        )


def document_limits(settings: Settings) -> DocumentLimits:
    return DocumentLimits(
        max_length=settings.max_query_length,
        max_tokens=settings.max_query_tokens,
        max_depth=settings.max_query_depth,
        max_aliases=settings.max_aliases,
    )


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or get_settings()
    limits = document_limits(settings)
    # Introspection (`__schema`, `__type`; `__typename` stays) is off in production by
    # default: MAILSYNC_INTROSPECTION.
    rules = [cost_rule(limits)]
    if not settings.introspection_enabled:
        rules.append(NoSchemaIntrospectionCustomRule)
    return MailsyncSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[User, Workspace, Contact, Email, Thread, Mailbox, Exclusion],
        extensions=[
            UnitOfWork,
            # Length and tokens are checked before and while parsing (the parse cache is
            # shared by every request); depth and aliases by one rule whose work is linear in
            # the document (graphql/limits.py).
            lambda: LimitedParser(limits),
            lambda: AddValidationRules(rules),
            # Shared by every request (module level, keyed by maxsize).
            lambda: ValidationCache(maxsize=512),
            ExpectedErrors,
            lambda: MaskErrors(should_mask_error=is_unexpected),
        ],
    )
