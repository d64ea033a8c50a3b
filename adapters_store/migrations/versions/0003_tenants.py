"""tenants: tenants, hashed API keys, and a tenant on every subject (existing ones go to 'default')

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03

Subject names become unique per tenant instead of globally. On SQLite the subjects table is rebuilt
(batch mode); ``adapters_store.database`` runs upgrades with foreign keys off so that dropping the old
table cannot cascade into ``adapters``, then checks every foreign key before committing.
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT_TENANT_ID = 1


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT_ID, "name": "default",
                              "created": datetime.now(timezone.utc)}])
    if op.get_bind().dialect.name == "postgresql":   # explicit id above: move the sequence past it
        op.execute("SELECT setval(pg_get_serial_sequence('tenants', 'id'), "
                   "(SELECT max(id) FROM tenants))")
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.Integer(),
                  sa.ForeignKey("tenants.id", ondelete="CASCADE", name="fk_api_keys_tenant_id"),
                  nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    with op.batch_alter_table("subjects") as batch:
        batch.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
    op.execute(f"UPDATE subjects SET tenant_id = {DEFAULT_TENANT_ID}")
    with op.batch_alter_table("subjects") as batch:
        batch.alter_column("tenant_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_constraint("uq_subjects_name", type_="unique")
        batch.create_unique_constraint("uq_subjects_tenant_name", ["tenant_id", "name"])
        batch.create_foreign_key("fk_subjects_tenant_id", "tenants", ["tenant_id"], ["id"])


def downgrade() -> None:
    bind = op.get_bind()
    clash = bind.execute(sa.text("SELECT name FROM subjects GROUP BY name HAVING count(*) > 1")).first()
    if clash is not None:
        raise RuntimeError(f"cannot downgrade: subject name {clash[0]!r} is used by several tenants")
    with op.batch_alter_table("subjects") as batch:
        batch.drop_constraint("fk_subjects_tenant_id", type_="foreignkey")
        batch.drop_constraint("uq_subjects_tenant_name", type_="unique")
        batch.create_unique_constraint("uq_subjects_name", ["name"])
        batch.drop_column("tenant_id")
    op.drop_table("api_keys")
    op.drop_table("tenants")
