"""Free text from users (names, search strings) checked before it goes near the database:
PostgreSQL refuses NUL in text and UTF-8 cannot encode an unpaired surrogate, so either would
fail inside the driver; `%` and `_` are LIKE wildcards, so a search escapes them. Messages
quote only an excerpt of what they refuse."""

from __future__ import annotations

from collections.abc import Sequence

from backend.kit.errors import ErrorCode, ServiceError

MAX_NAME_LENGTH = 200  # the name columns' length
MAX_SEARCH_LENGTH = 200
LIKE_ESCAPE = "\\"


def excerpt(value: str, limit: int = 60) -> str:
    """`value`, or its start and its length when it is longer than `limit`."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value)} characters)"


def unstorable(value: str) -> str | None:
    """What in `value` no text column can hold, or None."""
    if "\x00" in value:
        return "a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "an unpaired surrogate"
    return None


def check_storable(value: str, field: Sequence[str], what: str) -> str:
    problem = unstorable(value)
    if problem is not None:
        raise ServiceError(ErrorCode.INVALID_TEXT, f"The {what} contains {problem}.", list(field))
    return value


def clean_name(
    value: str | None, field: Sequence[str], *, what: str = "name", required: bool = False
) -> str | None:
    """The trimmed name (None when blank and not required), or INVALID_NAME (blank when
    required, longer than the column) or INVALID_TEXT."""
    trimmed = check_storable(value, field, what).strip() if value is not None else ""
    if not trimmed:
        if required:
            raise ServiceError(ErrorCode.INVALID_NAME, f"The {what} is empty.", list(field))
        return None
    if len(trimmed) > MAX_NAME_LENGTH:
        raise ServiceError(
            ErrorCode.INVALID_NAME,
            f"The {what} is {len(trimmed)} characters long; at most {MAX_NAME_LENGTH} fit.",
            list(field),
        )
    return trimmed


def clean_search(value: str | None, field: Sequence[str]) -> str | None:
    """The trimmed, lower-cased search term (None when blank), or INVALID_TEXT or
    INVALID_ARGUMENT (longer than MAX_SEARCH_LENGTH)."""
    if value is None:
        return None
    trimmed = check_storable(value, field, "search").strip().lower()
    if len(trimmed) > MAX_SEARCH_LENGTH:
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT,
            f"`search` must be at most {MAX_SEARCH_LENGTH} characters.",
            list(field),
        )
    return trimmed or None


def contains_pattern(term: str) -> str:
    """A LIKE pattern (escape character LIKE_ESCAPE) matching `term` literally anywhere."""
    escaped = (
        term.replace(LIKE_ESCAPE, LIKE_ESCAPE * 2)
        .replace("%", LIKE_ESCAPE + "%")
        .replace("_", LIKE_ESCAPE + "_")
    )
    return f"%{escaped}%"
