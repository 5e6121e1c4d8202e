"""Failures a user can fix. Services raise them; the GraphQL edge turns them into userErrors."""

from __future__ import annotations

from collections.abc import Sequence


class ServiceError(Exception):
    def __init__(self, code: str, message: str, field: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = list(field) if field is not None else None


class NotFound(ServiceError):
    def __init__(self, what: str, field: Sequence[str] | None = None) -> None:
        super().__init__("NOT_FOUND", f"{what} not found.", field)


class Forbidden(ServiceError):
    def __init__(self, message: str = "You are not allowed to do this.") -> None:
        super().__init__("FORBIDDEN", message)
