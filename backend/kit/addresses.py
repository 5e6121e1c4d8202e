"""Email addresses and domains: validation for input, normalization for matching (R2)."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

from backend.kit.errors import ErrorCode, ServiceError
from backend.kit.text import excerpt


def _idna_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def normalize_address(address: str) -> str:
    """Trim, lower-case, IDNA domain (R2). Never raises: used on whatever mail contains."""
    address = address.strip().strip("<>").strip()
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address.lower()
    return f"{local.lower()}@{_idna_domain(domain)}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


# Syntax only: intranet and special-use domains (corp.local, example.test) are real to CRM users.


def validate_address(address: str, field: list[str]) -> str:
    """Validate user input and return its normalized form, or raise INVALID_EMAIL."""
    try:
        checked = validate_email(
            address.strip(),
            check_deliverability=False,
            globally_deliverable=False,
            test_environment=True,
        )
    except EmailNotValidError as exc:
        raise ServiceError(
            ErrorCode.INVALID_EMAIL,
            f"'{excerpt(address)}' is not a valid email address: {excerpt(str(exc), 200)}",
            field,
        ) from exc
    return normalize_address(checked.normalized)


def validate_domain(domain: str, field: list[str]) -> str:
    """Validate a bare domain (exclusions) by checking a probe address on it."""
    candidate = domain.strip().lstrip("@").lower()
    try:
        validate_email(
            f"probe@{candidate}",
            check_deliverability=False,
            globally_deliverable=False,
            test_environment=True,
        )
    except EmailNotValidError as exc:
        raise ServiceError(
            ErrorCode.INVALID_DOMAIN, f"'{excerpt(domain)}' is not a valid domain.", field
        ) from exc
    return _idna_domain(candidate)


def domain_and_parents(domain: str) -> list[str]:
    """x.y.com -> [x.y.com, y.com, com]: a domain exclusion covers its subdomains (R4)."""
    parts = domain.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]
