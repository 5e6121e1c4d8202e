"""The `mailsync` command."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from backend.settings import Settings, get_settings

T = TypeVar("T")

app = typer.Typer(help="mailsync: CRM email sync over GraphQL.", no_args_is_help=True)
workspace_app = typer.Typer(help="Manage workspaces.", no_args_is_help=True)
user_app = typer.Typer(help="Manage users.", no_args_is_help=True)
token_app = typer.Typer(help="Issue and revoke API bearer tokens.", no_args_is_help=True)
app.add_typer(workspace_app, name="workspace")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # Each error's message only: the full text repeats the input, secrets included.
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"configuration error: {message}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _run(work: Callable[[Settings], Coroutine[Any, Any, T]]) -> T:
    settings = _settings()
    return asyncio.run(work(settings))


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1,
    access_log: Annotated[
        bool,
        typer.Option(help="Log every request (URLs carry OAuth codes and the push secret)."),
    ] = False,
) -> None:
    """Run the GraphQL API (HTTP and websockets) with uvicorn."""
    import uvicorn

    from backend.app import websocket_options

    settings = _settings()
    uvicorn.run(
        "backend.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=access_log,
        **websocket_options(settings),
        # Open subscriptions would otherwise hold a restart forever; clients reconnect.
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
) -> None:
    """Run the arq worker: sync passes and the scheduler that enqueues due ones every minute."""
    _settings()  # before worker.settings, which reads the settings as it is imported
    from arq.worker import get_kwargs

    from worker.resilient import ResilientWorker
    from worker.settings import WorkerSettings

    # arq's run_worker, with a worker that rides out a Redis restart.
    ResilientWorker(
        **{**get_kwargs(WorkerSettings), "burst": burst},  # type: ignore[arg-type]
        lease_seconds=WorkerSettings.lease_seconds,
    ).run()


@app.command()
def capture(
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 behind an MX record).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (25 for an MX record).")] = 2525,
) -> None:
    """Run the SMTP receiver of capture addresses (R16): mail Bcc'd or forwarded to a
    workspace's capture address is filed on its contacts' timelines."""

    async def work(settings: Settings) -> None:
        from backend.capture.smtp import start_receiver
        from backend.runtime import Runtime
        from backend.sending.queue import JobQueue
        from backend.settings import configure_logging

        configure_logging(settings)
        runtime = await Runtime.create(settings, jobs=JobQueue)
        try:
            server = await start_receiver(runtime, host, port)
            typer.echo(f"capture: SMTP for *@{settings.capture_domain} on {host}:{port}")
            async with server:
                await server.serve_forever()
        finally:
            await runtime.close()

    with contextlib.suppress(KeyboardInterrupt):
        _run(work)


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8900,
    push_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Where Gmail push notifications go, e.g. the API's /webhooks/google URL."
        ),
    ] = None,
    drop_pushes: Annotated[
        bool,
        typer.Option(
            help="Drop Gmail pushes above one a second per user, as Gmail does (mail they "
            "would announce waits for the next poll); by default they ride on the next push."
        ),
    ] = False,
) -> None:
    """Run the provider sandbox in memory: Google OAuth and the Gmail API, and the
    Microsoft identity platform and Graph mail (under /{tenant}/oauth2/v2.0 and /v1.0).

    Point mailsync at it with MAILSYNC_GOOGLE_BASE_URL=http://HOST:PORT.
    """
    import uvicorn

    from backend.sandbox.app import create_sandbox_app
    from backend.sandbox.google import GoogleSandbox

    google = GoogleSandbox(merge_pushes=not drop_pushes)
    if push_endpoint:
        google.push_endpoints["*"] = push_endpoint
    typer.echo(
        f"sandbox: Google (OAuth, Gmail) and Microsoft (identity, Graph) on http://{host}:{port}"
    )
    uvicorn.run(create_sandbox_app(google), host=host, port=port, log_level="warning")


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    downgrade: Annotated[bool, typer.Option(help="Downgrade to REVISION instead.")] = False,
) -> None:
    """Apply the database migrations (Alembic)."""
    from backend import migrations

    settings = _settings()
    if downgrade:
        migrations.downgrade(settings.database_url, revision)
    else:
        migrations.upgrade(settings.database_url, revision)
    typer.echo(f"database {'downgraded' if downgrade else 'upgraded'} to {revision}")


@workspace_app.command("create")
def workspace_create(
    name: Annotated[str, typer.Argument(help="The workspace's name.")],
    owner_email: Annotated[str, typer.Option("--owner-email", help="The owner's login address.")],
    owner_name: Annotated[
        str | None, typer.Option("--owner-name", help="The owner's name.")
    ] = None,
) -> None:
    """Create a workspace and its OWNER user."""
    from backend.db import Database
    from backend.kit.errors import ServiceError
    from backend.workspaces import service

    async def work(settings: Settings) -> str:
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                workspace, owner = await service.create_workspace(
                    session, name, owner_email, owner_name
                )
                return f"workspace {workspace.name} ({workspace.id}) created; owner {owner.email}"
        finally:
            await db.dispose()

    try:
        typer.echo(_run(work))
    except ServiceError as exc:
        _fail(exc.message)


@user_app.command("add")
def user_add(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace name or id.")],
    email: Annotated[str, typer.Option("--email", help="The user's login address.")],
    role: Annotated[str, typer.Option("--role", help="OWNER, ADMIN or USER.")] = "USER",
    name: Annotated[str | None, typer.Option("--name", help="The user's name.")] = None,
) -> None:
    """Add a user to a workspace."""
    import uuid

    from backend.auth import queries
    from backend.auth.tables import Role
    from backend.db import Database
    from backend.kit.errors import ErrorCode, ServiceError
    from backend.workspaces import service

    try:
        parsed_role = Role(role.upper())
    except ValueError:
        _fail(f"unknown role {role!r}: use OWNER, ADMIN or USER")
        return

    async def work(settings: Settings) -> str:
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                found = None
                try:
                    found = await queries.workspace_by_id(session, uuid.UUID(workspace))
                except ValueError:
                    found = await queries.workspace_by_name(session, workspace)
                if found is None:
                    raise ServiceError(ErrorCode.NOT_FOUND, f"no workspace named {workspace!r}")
                user = await service.add_user(session, found, email, parsed_role, name)
                return f"user {user.email} ({user.role.value}) added to {found.name}"
        finally:
            await db.dispose()

    try:
        typer.echo(_run(work))
    except ServiceError as exc:
        _fail(exc.message)


@token_app.command("create")
def token_create(
    email: Annotated[str, typer.Option("--email", help="The user the token acts as.")],
    days: Annotated[
        int | None, typer.Option(help="Lifetime in days (default from settings).")
    ] = None,
) -> None:
    """Print a new bearer token for a user."""
    from backend.auth import queries
    from backend.auth.service import issue_token
    from backend.db import Database

    async def work(settings: Settings) -> str | None:
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                user = await queries.user_by_email(session, email)
                if user is None:
                    return None
                ttl = (
                    timedelta(days=days) if days else timedelta(seconds=settings.token_ttl_seconds)
                )
                return await issue_token(session, settings.secret, user, ttl)
        finally:
            await db.dispose()

    token = _run(work)
    if token is None:
        _fail(f"no user with the address {email}")
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(token: Annotated[str, typer.Argument(help="The token to revoke.")]) -> None:
    """Revoke a bearer token at once."""
    from backend.auth.service import revoke_token
    from backend.auth.tokens import decode_token
    from backend.db import Database

    async def work(settings: Settings) -> bool:
        claims = decode_token(settings.secret, token)
        if claims is None:
            return False
        db = Database(settings.database_url)
        try:
            async with db.transaction() as session:
                return await revoke_token(session, claims.token_id)
        finally:
            await db.dispose()

    if not _run(work):
        _fail("not a valid, unrevoked token")
    typer.echo("revoked")


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Seed a demo workspace, print a token and run the API and a worker (SQLite by default)."""
    from backend import demo as demo_module

    demo_module.run(_settings(), host, port)


@app.command("export-schema")
def export_schema() -> None:
    """Print the GraphQL schema (SDL); schema.graphql at the repository root is this output."""
    from backend.api.schema import build_schema

    sys.stdout.write(build_schema().as_str() + "\n")


if __name__ == "__main__":
    app()
