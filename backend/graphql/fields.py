"""Fields read straight from a type's `row`, without a resolver.

A field with a resolver pays Strawberry's wrapper on every call (an `Info`, argument parsing,
the extension chain); a "basic" field (no resolver) is one attribute read. A timeline page
reads hundreds of such plain columns (docs/performance.md), so types declare them with
`from_row` instead of `@strawberry.field def x(self): return self.row.x`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strawberry.types.field import StrawberryField


class RowField(StrawberryField):
    def __init__(
        self,
        attribute: str | None,
        convert: Callable[[Any], Any] | None,
        graphql_name: str | None,
        description: str | None,
    ) -> None:
        super().__init__(graphql_name=graphql_name, description=description)
        # Not a constructor argument: the value comes from the row.
        self.init = False
        self.repr = False
        self.compare = False
        self.attribute = attribute
        self.convert = convert

    def get_result(self, source: Any, info: Any, args: list[Any], kwargs: Any) -> Any:
        value = getattr(source.row, self.attribute or self.python_name)
        return value if self.convert is None else self.convert(value)


def from_row(
    attribute: str | None = None,
    *,
    convert: Callable[[Any], Any] | None = None,
    name: str | None = None,
    description: str | None = None,
) -> Any:
    """`x: T = from_row()` reads `self.row.x` (or `attribute`), through `convert` if given."""
    return RowField(attribute, convert, name, description)
