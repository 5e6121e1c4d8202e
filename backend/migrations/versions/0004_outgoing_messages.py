"""outgoing_messages: the MIME of CRM-sent mail until its send settles; one email per
idempotency key and sender (R15)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outgoing_messages",
        sa.Column("email_id", sa.Uuid(), nullable=False),
        sa.Column("mailbox_id", sa.Uuid(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("provider_thread_id", sa.String(length=400), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["email_id"],
            ["emails.id"],
            name=op.f("fk_outgoing_messages_email_id_emails"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["mailbox_id"],
            ["mailboxes.id"],
            name=op.f("fk_outgoing_messages_mailbox_id_mailboxes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("email_id", name=op.f("pk_outgoing_messages")),
    )
    with op.batch_alter_table("outgoing_messages", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_outgoing_messages_mailbox_id"), ["mailbox_id"], unique=False
        )
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.create_index(
            "ux_emails_sender_idempotency_key",
            ["sent_by_id", "idempotency_key"],
            unique=True,
            sqlite_where=sa.text("idempotency_key IS NOT NULL"),
            postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("emails", schema=None) as batch_op:
        batch_op.drop_index("ux_emails_sender_idempotency_key")
    with op.batch_alter_table("outgoing_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outgoing_messages_mailbox_id"))
    op.drop_table("outgoing_messages")
