"""Limits on what a GraphQL document may cost before it runs: its length and tokens (checked
before and while parsing) and its depth and aliases (one validation rule).

The depth and alias counts are those of the document with every fragment spread expanded, but
they are computed without expanding anything: each fragment is measured once and its measure
reused wherever it is spread, so the work is linear in the document's size however the
fragments spread each other (a fragment spreading the next twice, twenty deep, is 2**20
expansions but twenty measures)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    parse,
)
from strawberry.extensions import SchemaExtension

from backend.kit.errors import ErrorCode


@dataclass(frozen=True)
class DocumentLimits:
    max_length: int
    max_tokens: int
    max_depth: int
    max_aliases: int


def too_large(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": ErrorCode.QUERY_TOO_LARGE.value})


def check_length(query: str, limits: DocumentLimits) -> GraphQLError | None:
    if len(query) > limits.max_length:
        return too_large(
            f"The query is {len(query)} characters long; the server takes at most "
            f"{limits.max_length}."
        )
    return None


@functools.lru_cache(maxsize=512)
def _parse(query: str, max_tokens: int) -> DocumentNode:
    return parse(query, max_tokens=max_tokens)


def parse_document(query: str, limits: DocumentLimits) -> DocumentNode:
    """The parsed document (cached), or a coded GraphQLError when it is too long or has too
    many tokens; a syntax error is raised as graphql-core reports it."""
    error = check_length(query, limits)
    if error is not None:
        raise error
    try:
        return _parse(query, limits.max_tokens)
    except GraphQLSyntaxError as exc:
        if "tokens" in exc.message and "Parsing aborted" in exc.message:
            raise too_large(
                f"The query has more than {limits.max_tokens} tokens, the most the server takes."
            ) from None
        raise


class LimitedParser(SchemaExtension):
    """Parses (with a shared cache) only documents within the length and token limits."""

    def __init__(self, limits: DocumentLimits) -> None:
        super().__init__()
        self.limits = limits

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.graphql_document is None and context.query is not None:
            context.graphql_document = parse_document(context.query, self.limits)
        yield


@dataclass(frozen=True)
class Measure:
    depth: int
    aliases: int


class DocumentCost:
    """Depth and alias counts of each operation as if its fragments were expanded, measuring
    each fragment once. `visited` counts the selections looked at (the tests' measure of
    the work)."""

    def __init__(self, document: DocumentNode, cap: int) -> None:
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        # Counts above `cap` are all the same verdict: keep the numbers small.
        self.cap = cap
        self.measured: dict[str, Measure] = {}
        self.visiting: set[str] = set()
        self.visited = 0

    def operation(self, operation: OperationDefinitionNode) -> Measure:
        return self.selection_set(operation.selection_set)

    def fragment(self, name: str) -> Measure:
        known = self.measured.get(name)
        if known is not None:
            return known
        definition = self.fragments.get(name)
        if definition is None or name in self.visiting:
            # Unknown fragments and cycles are other rules' errors.
            return Measure(0, 0)
        self.visiting.add(name)
        try:
            measure = self.selection_set(definition.selection_set)
        finally:
            self.visiting.discard(name)
        self.measured[name] = measure
        return measure

    def selection_set(self, selection_set: SelectionSetNode | None) -> Measure:
        depth = 0
        aliases = 0
        for selection in selection_set.selections if selection_set else ():
            self.visited += 1
            if isinstance(selection, FieldNode):
                if selection.alias is not None:
                    aliases += 1
                if selection.selection_set is not None:
                    inner = self.selection_set(selection.selection_set)
                    # Introspection (`__schema`, `__type`) nests deep by design: its depth is
                    # not counted, its aliases are.
                    if not selection.name.value.startswith("__"):
                        depth = max(depth, 1 + inner.depth)
                    aliases += inner.aliases
            elif isinstance(selection, InlineFragmentNode):
                inner = self.selection_set(selection.selection_set)
                depth = max(depth, inner.depth)
                aliases += inner.aliases
            elif isinstance(selection, FragmentSpreadNode):
                inner = self.fragment(selection.name.value)
                depth = max(depth, inner.depth)
                aliases += inner.aliases
            aliases = min(aliases, self.cap)
        return Measure(min(depth, self.cap), aliases)


def cost_rule(limits: DocumentLimits) -> type[ASTValidationRule]:
    """A validation rule refusing operations deeper than `max_depth` (fields with a selection
    set, nested; introspection fields' depth is not counted) or with more than `max_aliases`
    aliases in all (fragments counted as often as they are spread, introspection included)."""

    class CostLimits(ASTValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            document = context.document
            cost = DocumentCost(document, cap=max(limits.max_depth, limits.max_aliases) + 1)
            aliases = 0
            for definition in document.definitions:
                if not isinstance(definition, OperationDefinitionNode):
                    continue
                measure = cost.operation(definition)
                name = definition.name.value if definition.name else "anonymous"
                if measure.depth > limits.max_depth:
                    context.report_error(
                        GraphQLError(
                            f"'{name}' exceeds maximum operation depth of {limits.max_depth}",
                            definition,
                            extensions={"code": ErrorCode.QUERY_TOO_DEEP.value},
                        )
                    )
                aliases += measure.aliases
            if aliases > limits.max_aliases:
                context.report_error(
                    GraphQLError(
                        f"Too many aliases: the server allows {limits.max_aliases}.",
                        extensions={"code": ErrorCode.TOO_MANY_ALIASES.value},
                    )
                )

    return CostLimits
