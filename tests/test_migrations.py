"""Migrations upgrade an empty database to head and downgrade back, on both backends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa

from backend import migrations
from backend.db import create_engine, metadata
from tests.conftest import create_postgres_database, drop_postgres_database


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    await engine.dispose()
    return names - {"alembic_version"}


async def _round_trip(url: str) -> None:
    await asyncio.to_thread(migrations.upgrade, url)
    assert await _tables(url) == set(metadata.tables)
    await asyncio.to_thread(migrations.downgrade, url, "base")
    assert await _tables(url) == set()
    await asyncio.to_thread(migrations.upgrade, url)
    assert await _tables(url) == set(metadata.tables)


async def test_migrations_round_trip_on_empty_postgresql() -> None:
    name, url = await create_postgres_database()
    try:
        await _round_trip(url)
    finally:
        await drop_postgres_database(name)


async def test_migrations_round_trip_on_empty_sqlite(tmp_path: Path) -> None:
    await _round_trip(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")


async def test_models_and_migrations_agree(database_url: str) -> None:
    """Autogenerate against the migrated test database finds nothing to do."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(database_url)
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
        )
    await engine.dispose()
    assert diff == []
