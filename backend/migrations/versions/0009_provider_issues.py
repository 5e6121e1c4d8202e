"""provider_issues: a provider refusing mailsync's own configuration (passes, push), for the
health checks

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_issues",
        sa.Column(
            "provider",
            sa.Enum("GMAIL", "MICROSOFT", "IMAP", name="provider", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column(
            "problem",
            sa.Enum("configuration", "push", name="providerproblem", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("fix", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "problem", name=op.f("pk_provider_issues")),
    )


def downgrade() -> None:
    op.drop_table("provider_issues")
