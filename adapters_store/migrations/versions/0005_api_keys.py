"""api keys: a public prefix (shown at creation and in listings) and when each key was last used

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Keys issued before this revision have no prefix (their plaintext was never stored); they are listed by id.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("prefix", sa.String(16), nullable=True))
        batch.add_column(sa.Column("last_used", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used")
        batch.drop_column("prefix")
