"""Engine and sessions. Only the edge (a GraphQL operation, a job, a CLI command) commits."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = SQLModel.metadata


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def table_of(model: type[SQLModel]) -> sa.Table:
    """The Core table of a model, for bulk statements that skip the ORM's per-row work."""
    table: sa.Table = model.__table__  # type: ignore[attr-defined]
    return table


def enum_type(enum_cls: type[enum.Enum]) -> sa.Enum:
    """Enums as plain strings: no native PostgreSQL types, so migrations stay portable."""
    return sa.Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


# PostgreSQL's deadlock_detected: the statement was the victim of a lock cycle with another
# transaction; nothing is wrong with it, and it succeeds when run again.
DEADLOCK_SQLSTATE = "40P01"


def is_deadlock(exc: BaseException) -> bool:
    """Whether `exc` is a statement chosen as a deadlock's victim (retry it, in a savepoint
    or a new transaction)."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    return DEADLOCK_SQLSTATE in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None))


# Execution option of a session that only reads (see `read_only`).
READ_ONLY = "mailsync_read_only"


def read_only(session: AsyncSession) -> None:
    """Declare that `session` will only read, before its first statement: on SQLite its
    transaction then begins DEFERRED instead of taking the write lock. Too late once the
    session has begun (the option applies when it connects)."""
    sync_session = session.sync_session
    sync_session.execution_options = sync_session.execution_options.union({READ_ONLY: True})


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            # WAL lets the API read while a worker writes; foreign keys are off by default.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            # Let SQLAlchemy, not the driver, issue BEGIN: savepoints then work as documented.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # A transaction that may write takes the write lock up front (IMMEDIATE): a
            # deferred BEGIN that later writes can fail with SQLITE_BUSY when the API and a
            # worker write at once. One that only reads begins DEFERRED and never takes it,
            # so in WAL mode it neither waits for a writer nor holds one up.
            if connection.get_execution_options().get(READ_ONLY):
                connection.exec_driver_sql("BEGIN DEFERRED")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **kwargs)


class _TaskReentrantLock:
    """Serializes a session between tasks while letting one task re-enter (scalars -> execute)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if self._owner is task and task is not None:
            self._depth += 1
            return
        await self._lock.acquire()
        self._owner, self._depth = task, 1

    async def __aexit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()


class SerializedAsyncSession(AsyncSession):
    """GraphQL resolves sibling fields concurrently; an AsyncSession must not be used that way.

    Every statement takes the session's lock, so concurrent resolvers (and their DataLoaders)
    share one session and one transaction safely, one statement at a time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._statement_lock = _TaskReentrantLock()

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        async with self._statement_lock:
            return await super().execute(*args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        async with self._statement_lock:
            return await super().scalar(*args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        async with self._statement_lock:
            return await super().scalars(*args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        async with self._statement_lock:
            return await super().get(*args, **kwargs)

    async def flush(self, *args: Any, **kwargs: Any) -> None:
        async with self._statement_lock:
            await super().flush(*args, **kwargs)

    async def delete(self, instance: object) -> None:
        async with self._statement_lock:
            await super().delete(instance)

    async def refresh(self, *args: Any, **kwargs: Any) -> None:
        async with self._statement_lock:
            await super().refresh(*args, **kwargs)


class Database:
    """The engine and session factory of one process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.sessionmaker = async_sessionmaker(
            self.engine, class_=SerializedAsyncSession, expire_on_commit=False, autoflush=False
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A unit of work for an edge: committed when the block succeeds, rolled back otherwise."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()
