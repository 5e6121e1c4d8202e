"""R4 in one place: which addresses an exclusion list covers."""

from __future__ import annotations

from collections.abc import Collection

from backend.kit.addresses import domain_and_parents, domain_of


def is_excluded(address: str, excluded: Collection[str]) -> bool:
    """`excluded` holds normalized addresses and bare domains; a domain covers its subdomains."""
    if address in excluded:
        return True
    return any(d in excluded for d in domain_and_parents(domain_of(address)))
