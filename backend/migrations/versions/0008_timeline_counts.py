"""contacts.timeline_count and workspaces.addresses_version, kept by triggers: a contact's
timeline total costs one row however long the timeline, and the API caches each
workspace's own addresses until the version moves

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Triggers rather than service code: rows leave timeline_entries by cascades too (an email,
# a mailbox's history, a contact), and every door that files mail would have to remember.
# (name, table, event, condition, target update using NEW/OLD)
TRIGGERS: list[tuple[str, str, str, str | None, str]] = [
    (
        "trg_timeline_count_insert",
        "timeline_entries",
        "INSERT",
        None,
        "UPDATE contacts SET timeline_count = timeline_count + 1 WHERE id = NEW.contact_id",
    ),
    (
        "trg_timeline_count_delete",
        "timeline_entries",
        "DELETE",
        None,
        "UPDATE contacts SET timeline_count = timeline_count - 1 WHERE id = OLD.contact_id",
    ),
    (
        "trg_addresses_mailbox_insert",
        "mailboxes",
        "INSERT",
        None,
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = NEW.workspace_id",
    ),
    (
        "trg_addresses_mailbox_delete",
        "mailboxes",
        "DELETE",
        None,
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = OLD.workspace_id",
    ),
    (
        "trg_addresses_mailbox_update",
        "mailboxes",
        "UPDATE",
        "{old}.email_address <> {new}.email_address OR {old}.owner_id <> {new}.owner_id "
        "OR CAST({old}.aliases AS TEXT) <> CAST({new}.aliases AS TEXT)",
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = NEW.workspace_id",
    ),
    (
        "trg_addresses_user_insert",
        "users",
        "INSERT",
        None,
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = NEW.workspace_id",
    ),
    (
        "trg_addresses_user_delete",
        "users",
        "DELETE",
        None,
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = OLD.workspace_id",
    ),
    (
        "trg_addresses_user_update",
        "users",
        "UPDATE",
        "{old}.email <> {new}.email",
        "UPDATE workspaces SET addresses_version = addresses_version + 1 "
        "WHERE id = NEW.workspace_id",
    ),
]


def _create_triggers(dialect: str) -> None:
    for name, table, event, condition, action in TRIGGERS:
        if dialect == "postgresql":
            when = condition.format(old="OLD", new="NEW") if condition else None
            op.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN {action}; RETURN NULL; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW "
                + (f"WHEN ({when}) " if when else "")
                + f"EXECUTE FUNCTION {name}()"
            )
        else:
            when = condition.format(old="OLD", new="NEW") if condition else None
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW "
                + (f"WHEN {when} " if when else "")
                + f"BEGIN {action}; END"
            )


def _drop_triggers(dialect: str) -> None:
    for name, table, *_ in TRIGGERS:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("timeline_count", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("addresses_version", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE contacts SET timeline_count = "
        "(SELECT count(*) FROM timeline_entries WHERE timeline_entries.contact_id = contacts.id)"
    )
    _create_triggers(dialect)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_triggers(dialect)
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("addresses_version")
    with op.batch_alter_table("contacts", schema=None) as batch_op:
        batch_op.drop_column("timeline_count")
