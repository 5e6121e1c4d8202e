"""Relationships never load behind a resolver's back."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import RelationshipProperty
from sqlmodel import SQLModel

import backend.models  # noqa: F401
from backend.contacts.tables import Contact
from backend.db import metadata
from backend.runtime import Runtime
from tests.factories import Factory


def test_every_relationship_raises_instead_of_lazy_loading() -> None:
    relationships = [
        (mapper.class_.__name__, rel.key, rel.lazy)
        for mapper in SQLModel._sa_registry.mappers
        for rel in mapper.relationships
        if isinstance(rel, RelationshipProperty)
    ]
    assert relationships, "the model declares relationships"
    assert [r for r in relationships if r[2] != "raise"] == []
    assert len(metadata.tables) >= 13


async def test_touching_an_unloaded_relationship_raises(factory: Factory, runtime: Runtime) -> None:
    owner = await factory.workspace()
    contact = await factory.contact(owner)
    async with runtime.db.sessionmaker() as session:
        row = await session.get(Contact, contact.id)
        assert row is not None
        with pytest.raises(InvalidRequestError, match="lazy='raise'"):
            _ = row.addresses
