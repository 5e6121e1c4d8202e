"""Turning input global ids into row ids inside a service call, so bad ids become userErrors."""

from __future__ import annotations

import uuid

from backend.graphql.relay import id_of
from backend.kit.errors import NotFound


def required_id(value: str, type_name: str, field: list[str]) -> uuid.UUID:
    row_id = id_of(value, type_name)
    if row_id is None:
        raise NotFound(type_name, field)
    return row_id


def optional_id(value: str | None, type_name: str, field: list[str]) -> uuid.UUID | None:
    return None if value is None else required_id(value, type_name, field)
