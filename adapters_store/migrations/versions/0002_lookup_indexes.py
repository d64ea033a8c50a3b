"""lookup indexes: adapters by blob hash (gc, dedupe) and by base fingerprint (list filter)

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""
from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_adapters_sha256", "adapters", ["sha256"])
    op.create_index("ix_adapters_base_fingerprint", "adapters", ["base_fingerprint"])


def downgrade() -> None:
    op.drop_index("ix_adapters_base_fingerprint", table_name="adapters")
    op.drop_index("ix_adapters_sha256", table_name="adapters")
