"""Websocket fan-out: one resolution per event and group, not one per subscriber.

Subscriptions over a websocket whose document, variables and operation name are the same
form a group (per workspace). An event is prepared once per group (the row loads of the
payload, in one read-only unit of work per event shared by every group), then executed once
per R17 visibility class among the group's members, serialized once, and the same bytes are
queued on each member's connection. Delivering an event to one more subscriber costs a dict
lookup and a string concatenation, no SQL and no GraphQL execution.

Strawberry keeps its part of the protocol: it parses, validates (our limits included),
answers errors and sends `complete`; the subscription's resolver registers its operation
here and waits until the operation ends (the client's `complete`, a disconnect, or the
subscription's lifetime). Frames go through a bounded per-connection outbox: a client that
lets it overflow is closed with `SLOW_CLIENT_CLOSE_CODE`, and no other client waits for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, cast

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    execute,
    get_named_type,
)
from starlette.websockets import WebSocket
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

from backend.events import bus
from backend.graphql.context import Context, Info, current_scope
from backend.graphql.extensions import is_unexpected, masked
from backend.kit import clock
from backend.kit.errors import ServiceError

if TYPE_CHECKING:
    from strawberry import Schema

    from backend.auth.service import Viewer
    from backend.runtime import Runtime

log = logging.getLogger(__name__)

# The standard "try again later" close: the client was too slow to take its events. Clients
# (graphql-ws's included) reconnect after it.
SLOW_CLIENT_CLOSE_CODE = 1013
SLOW_CLIENT_CLOSE_REASON = "too slow: events waiting beyond the send queue"

# Events of one workspace waiting for their dispatch, at most (the same bound as the queue of
# an HTTP subscription, bus.QUEUE_SIZE); beyond it they are dropped for one `GAP`.
PENDING_LIMIT = bus.QUEUE_SIZE

# How long an operation that ends on its own waits for its frames before its `complete`.
FLUSH_SECONDS = 10.0

# Who a viewer is, for everything a result may depend on besides the event.
ViewerKey = tuple[uuid.UUID, bool]

# An event made ready for a group: the root value of its subscription field, and which R17
# class a viewer is in for it (None: this viewer gets nothing).
Classifier = Callable[["Viewer"], Hashable | None]
Prepared = tuple[object, Classifier] | None
Prepare = Callable[[dict[str, Any], Info], Awaitable[Prepared]]


@dataclass(frozen=True, slots=True)
class StreamTarget:
    """The websocket operation a resolver runs for, as the client sent it."""

    operation_id: str
    frame_type: str  # "next" (graphql-transport-ws) or "data" (graphql-ws)
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None


# Set by the websocket handlers in each operation's task, read by the subscription resolver.
current_stream: ContextVar[StreamTarget | None] = ContextVar("current_stream", default=None)


class FanoutTransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    async def run_operation(self, operation: Operation[Context, None]) -> None:
        current_stream.set(
            StreamTarget(
                operation.id,
                "next",
                operation.query,
                operation.variables,
                operation.operation_name,
            )
        )
        await super().run_operation(operation)


class FanoutWSHandler(BaseGraphQLWSHandler[Context, None]):
    async def handle_async_results(
        self,
        operation_id: str,
        query: str,
        operation_name: str | None,
        variables: dict[str, object] | None,
    ) -> None:
        current_stream.set(StreamTarget(operation_id, "data", query, variables, operation_name))
        await super().handle_async_results(operation_id, query, operation_name, variables)


# ---------------------------------------------------------------------------------- outbox


class Outbox:
    """A connection's frames not yet handed to the server, at most `limit` of them, behind
    the one being written. A writer task runs only while a send waits for the transport, so
    an idle connection holds no task."""

    __slots__ = ("__weakref__", "closed", "frames", "limit", "websocket", "writer")

    def __init__(self, websocket: WebSocket, limit: int) -> None:
        self.websocket = websocket
        self.limit = limit
        self.frames: deque[str] = deque()
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    def push(self, frame: str) -> None:
        if self.closed:
            return
        if self.writer is None:
            self._send_now(frame)
            return
        if len(self.frames) >= self.limit:
            self.overflow()
            return
        self.frames.append(frame)

    def _send_now(self, frame: str) -> None:
        """Run the send inline as far as it goes: a transport that is not paused takes the
        frame at once, with no task per connection and event (most of a large fan-out's
        cost otherwise); a send that has to wait finishes in the writer task."""
        send = self.websocket.send_text(frame)
        try:
            waiting = send.send(None)
        except StopIteration:
            return
        except Exception:
            self._gone()
            return
        self.writer = asyncio.create_task(self._write(send, waiting))

    async def _write(self, send: Coroutine[Any, Any, None], waiting: object) -> None:
        try:
            await _resume(send, waiting)
            while self.frames and not self.closed:
                # Waits while the transport is paused (the client reads slower than we write).
                await self.websocket.send_text(self.frames[0])
                if self.frames:
                    self.frames.popleft()
        except asyncio.CancelledError:
            raise
        except Exception:
            self._gone()
        finally:
            self.writer = None

    def _gone(self) -> None:
        """The client went away; the handler notices and ends its operations."""
        self.closed = True
        self.frames.clear()

    def overflow(self) -> None:
        """Close the connection with a code rather than let it hold memory or anyone else."""
        self.closed = True
        self.frames.clear()
        if self.writer is not None:
            self.writer.cancel()
        log.info("closing a websocket whose client does not keep up with its events")
        task = asyncio.create_task(self._close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _close(self) -> None:
        # The close frame waits for the transport like any frame; uvicorn's keep-alive ping
        # ends a client that never reads again.
        try:
            await self.websocket.close(SLOW_CLIENT_CLOSE_CODE, SLOW_CLIENT_CLOSE_REASON)
        except Exception:
            log.debug("the slow client was gone before its close", exc_info=True)

    async def flushed(self) -> None:
        """Wait (a while) for the frames queued so far, so a `complete` does not pass them."""
        writer = self.writer
        if writer is not None:
            await asyncio.wait({writer}, timeout=FLUSH_SECONDS)


async def _resume(send: Coroutine[Any, Any, None], waiting: object) -> None:
    """Drive a coroutine started by hand (`send.send(None)` returned `waiting`, what it
    awaits) to its end, as a task would have."""
    try:
        while True:
            if asyncio.isfuture(waiting):
                await asyncio.wait((waiting,))
            else:  # a bare yield, as `asyncio.sleep(0)` makes
                await asyncio.sleep(0)
            waiting = send.send(None)
    except StopIteration:
        return
    finally:
        send.close()  # a no-op once it ended; unwinds it when we are cancelled


_closing: set[asyncio.Task[None]] = set()
_outboxes: weakref.WeakKeyDictionary[Context, Outbox] = weakref.WeakKeyDictionary()


def outbox_for(context: Context, websocket: WebSocket, limit: int) -> Outbox:
    outbox = _outboxes.get(context)
    if outbox is None:
        outbox = _outboxes[context] = Outbox(websocket, limit)
    return outbox


# ---------------------------------------------------------------------------------- groups


class Member:
    __slots__ = ("outbox", "prefix", "viewer", "viewer_key")

    def __init__(self, outbox: Outbox, target: StreamTarget, viewer: Viewer) -> None:
        self.outbox = outbox
        # Every frame of this operation is this prefix, the shared payload and a brace.
        self.prefix = (
            f'{{"id":{json.dumps(target.operation_id)},"type":"{target.frame_type}","payload":'
        )
        self.viewer = viewer
        self.viewer_key: ViewerKey = (viewer.user.id, viewer.is_admin)


GroupKey = tuple[str, str | None, str, ViewerKey | None]


class Group:
    __slots__ = ("document", "members", "prepare", "schema", "variables")

    def __init__(
        self,
        schema: Schema,
        document: DocumentNode,
        variables: dict[str, Any] | None,
        prepare: Prepare,
    ) -> None:
        self.schema = schema
        self.document = document
        self.variables = variables
        self.prepare = prepare
        self.members: dict[Member, None] = {}  # insertion-ordered set


class WorkspaceFanout:
    """A workspace's groups, one hub subscriber for all of them."""

    def __init__(self, fanout: Fanout, workspace_id: str) -> None:
        self.fanout = fanout
        self.workspace_id = workspace_id
        self.groups: dict[GroupKey, Group] = {}
        self.pending: deque[dict[str, Any]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.size = 0
        # Times this workspace's subscribers were told that events waiting here were dropped.
        self.gaps = 0

    def __len__(self) -> int:
        return self.size

    def deliver(self, event: dict[str, Any]) -> None:
        if len(self.pending) >= PENDING_LIMIT:
            # A burst (a first sync's thousands of emailReceived) outruns the dispatch: drop
            # what waits and say so, as the hub does when it loses events, rather than grow
            # without bound; subscribers read again on the gap.
            self.pending.clear()
            self.pending.append({**bus.GAP, bus.GAP_AT: clock.now().isoformat()})
            self.gaps += 1
            log.warning(
                "workspace %s: events came faster than delivered; dropped", self.workspace_id
            )
        self.pending.append(event)
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"fanout-{self.workspace_id}")

    async def _run(self) -> None:
        try:
            while self.pending:
                event = self.pending.popleft()
                try:
                    await self._dispatch(event)
                except Exception:
                    log.exception("event %s could not be delivered", event.get("type"))
        finally:
            self.task = None

    async def _dispatch(self, event: dict[str, Any]) -> None:
        groups = [g for g in self.groups.values() if g.members]
        if not groups:
            return
        runtime = self.fanout.runtime
        someone = next(iter(groups[0].members)).viewer
        async with runtime.unit_of_work(read_only=True) as work:
            work.discard()  # delivering an event only reads
            # One scope (session and loaders) for every group: each row loads once per event.
            # Loaders depend on the workspace only, never on which of its users asks.
            token = current_scope.set(Context(runtime, someone).open_scope(work))
            try:
                for group in groups:
                    try:
                        await self._dispatch_group(group, event)
                    except Exception:  # one group's failure is no reason to skip the others
                        log.exception("event %s failed for one subscription", event.get("type"))
            finally:
                current_scope.reset(token)

    async def _dispatch_group(self, group: Group, event: dict[str, Any]) -> None:
        members = list(group.members)
        if not members:
            return
        runtime = self.fanout.runtime
        prepared = await group.prepare(event, _info(Context(runtime, members[0].viewer)))
        if prepared is None:
            return
        root, classify = prepared
        class_of: dict[ViewerKey, Hashable | None] = {}
        classes: dict[Hashable, list[Member]] = {}
        for member in members:
            key = member.viewer_key
            if key not in class_of:
                class_of[key] = classify(member.viewer)
            visibility = class_of[key]
            if visibility is not None:
                classes.setdefault(visibility, []).append(member)
        for same in classes.values():
            payload = await self._execute(group, root, same[0].viewer)
            # Clients often number their operations alike ("1"): those share the frame too.
            frames: dict[str, str] = {}
            for member in same:
                frame = frames.get(member.prefix)
                if frame is None:
                    frame = frames[member.prefix] = member.prefix + payload + "}"
                member.outbox.push(frame)

    async def _execute(self, group: Group, root: object, viewer: Viewer) -> str:
        result = execute(
            group.schema._schema,
            group.document,
            root_value=root,
            context_value=Context(self.fanout.runtime, viewer),
            variable_values=group.variables,
        )
        if isawaitable(result):
            result = await result
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            group.schema.process_errors(list(result.errors))
            payload["errors"] = [_formatted(e) for e in result.errors]
        return json.dumps(payload)

    def join(self, key: GroupKey, member: Member, make: Callable[[], Group]) -> None:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = make()
        group.members[member] = None
        self.size += 1

    def leave(self, key: GroupKey, member: Member) -> None:
        group = self.groups.get(key)
        if group is None or group.members.pop(member, False) is False:
            return
        self.size -= 1
        if not group.members:
            del self.groups[key]


class Fanout:
    """The process's websocket subscriptions, by workspace."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.workspaces: dict[str, WorkspaceFanout] = {}

    @contextmanager
    def member(
        self, workspace_id: str, key: GroupKey, member: Member, make: Callable[[], Group]
    ) -> Iterator[None]:
        hub = self.runtime.hub
        if hub is None:
            raise RuntimeError("this process has no event hub")
        workspace = self.workspaces.get(workspace_id)
        if workspace is None:
            workspace = self.workspaces[workspace_id] = WorkspaceFanout(self, workspace_id)
            hub.attach(workspace_id, workspace)
        workspace.join(key, member, make)
        try:
            yield
        finally:
            workspace.leave(key, member)
            if not workspace.size and self.workspaces.get(workspace_id) is workspace:
                del self.workspaces[workspace_id]
                hub.detach(workspace_id, workspace)


_fanouts: weakref.WeakKeyDictionary[Runtime, Fanout] = weakref.WeakKeyDictionary()


def fanout_of(runtime: Runtime) -> Fanout:
    fanout = _fanouts.get(runtime)
    if fanout is None:
        fanout = _fanouts[runtime] = Fanout(runtime)
    return fanout


async def serve(info: Info, prepare: Prepare, lifetime: float) -> bool:
    """Run a websocket subscription through the fan-out until its operation ends or
    `lifetime` passes; False when this operation is not on a websocket (the caller then
    resolves each event itself)."""
    target = current_stream.get()
    context = info.context
    websocket = context.request
    viewer = context.viewer
    if target is None or viewer is None or not isinstance(websocket, WebSocket):
        return False
    raw = info._raw_info
    operation, fragments = raw.operation, raw.fragments
    per_viewer = None if class_safe(raw.schema, operation, fragments) else _viewer_key(viewer)
    key: GroupKey = (
        target.query,
        target.operation_name,
        json.dumps(target.variables or {}, sort_keys=True, default=str),
        per_viewer,
    )
    outbox = outbox_for(context, websocket, context.runtime.settings.ws_send_queue)
    member = Member(outbox, target, viewer)

    def make() -> Group:
        document = DocumentNode(definitions=(operation, *fragments.values()))
        return Group(info.schema, document, target.variables, prepare)

    with fanout_of(context.runtime).member(str(viewer.workspace_id), key, member, make):
        await asyncio.sleep(lifetime)
    await outbox.flushed()
    return True


def _viewer_key(viewer: Viewer) -> ViewerKey:
    return (viewer.user.id, viewer.is_admin)


@dataclass(frozen=True, slots=True)
class _BareInfo:
    """What loaders read of an `Info`: the context (whose scope is the current one)."""

    context: Context


def _info(context: Context) -> Info:
    return cast("Info", _BareInfo(context))


def _formatted(error: GraphQLError) -> dict[str, Any]:
    """As the MaskErrors and ExpectedErrors extensions would have it."""
    if is_unexpected(error):
        return dict(masked(error).formatted)
    original = error.original_error
    if isinstance(original, ServiceError):
        error.extensions = {
            "code": original.code,
            **({"field": original.field} if original.field else {}),
        }
    return dict(error.formatted)


# ------------------------------------------------------------------------- R17 visibility

# The fields whose value depends on the viewer at most through the event's R17 class (how
# much of the event's email they may read, whether they manage its mailbox); None: every
# field of the type. A document that selects only these is executed once per class for all
# its subscribers; any other (a thread's subject or emails, a contact's timeline, a user's
# mailboxes: they depend on other mail and on who asks) once per user and role.
_CLASS_SAFE: dict[str, frozenset[str] | None] = {
    "Subscription": None,
    "EmailEvent": frozenset({"email", "contacts", "cursor"}),
    "MailboxStatusEvent": None,
    "SyncPassEvent": None,
    "EventsMissedEvent": None,
    "Email": frozenset(
        {
            "id",
            "direction",
            "source",
            "from",
            "to",
            "cc",
            "bcc",
            "subject",
            "snippet",
            "bodyText",
            "bodyHtml",
            "sentAt",
            "sentBy",
            "attachments",
            "contacts",
            "messageId",
            "deliveryStatus",
            "deliveryError",
            "mailbox",
            "thread",
        }
    ),
    "Thread": frozenset({"id", "lastEmailAt", "emailCount", "participants", "contacts"}),
    "Participant": frozenset({"email", "name", "contact", "user"}),
    "Attachment": None,
    "Contact": frozenset(
        {
            "id",
            "name",
            "email",
            "additionalEmails",
            "owner",
            "emailSyncEnabled",
            "createdAt",
            "lastEmailAt",
        }
    ),
    "User": frozenset({"id", "name", "email", "role"}),
    "Mailbox": frozenset(
        {
            "id",
            "provider",
            "emailAddress",
            "aliases",
            "owner",
            "status",
            "syncMode",
            "visibility",
            "connectedAt",
            "lastSyncedAt",
            "lastEmailSyncedAt",
            "lastError",
            "errors",
            "activity",
        }
    ),
    "SyncError": None,
    "SyncErrorConnection": None,
    "SyncErrorEdge": None,
    "SyncActivity": None,
    "PageInfo": None,
    "Node": frozenset({"id"}),
}


def class_safe(
    schema: GraphQLSchema,
    operation: OperationDefinitionNode,
    fragments: dict[str, FragmentDefinitionNode],
) -> bool:
    """Whether the operation selects only fields of `_CLASS_SAFE` (fragments included)."""
    root = schema.subscription_type
    return root is not None and _safe(schema, root, operation.selection_set, fragments, set())


def _safe(
    schema: GraphQLSchema,
    parent: GraphQLNamedType,
    selections: SelectionSetNode,
    fragments: dict[str, FragmentDefinitionNode],
    spread: set[str],
) -> bool:
    for selection in selections.selections:
        if isinstance(selection, FieldNode):
            name = selection.name.value
            if name == "__typename":
                continue
            allowed = _CLASS_SAFE.get(parent.name, frozenset())
            if allowed is not None and name not in allowed:
                return False
            if not isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
                return False
            field = parent.fields.get(name)
            if field is None:
                return False
            if selection.selection_set is not None and not _safe(
                schema, get_named_type(field.type), selection.selection_set, fragments, spread
            ):
                return False
        elif isinstance(selection, InlineFragmentNode):
            condition = selection.type_condition
            inner = schema.get_type(condition.name.value) if condition else parent
            if inner is None or not _safe(
                schema, inner, selection.selection_set, fragments, spread
            ):
                return False
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            if name in spread:
                continue
            spread.add(name)
            fragment = fragments.get(name)
            inner = schema.get_type(fragment.type_condition.name.value) if fragment else None
            if fragment is None or inner is None:
                return False
            if not _safe(schema, inner, fragment.selection_set, fragments, spread):
                return False
    return True
