"""workspaces.label_synced_mail; drop the unused database pass lock of mailboxes

One pass per mailbox is guaranteed by the job queue (the arq job id), so the columns of the
earlier database lock were never written.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workspaces") as batch:
        batch.add_column(
            sa.Column("label_synced_mail", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("pass_token")
        batch.drop_column("pass_lock_expires_at")
        batch.drop_column("pass_requested")


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(
            sa.Column("pass_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("pass_lock_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("pass_token", sa.String(length=64), nullable=True))
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("label_synced_mail")
