"""SQLAlchemy 2.0 models of the registry. Migrations in ``migrations/versions`` mirror this file."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String,
                        Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAME_LENGTH = 128
FINGERPRINT_LENGTH = 128


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, datetime: DateTime(timezone=True)}


class BaseModel(Base):
    """A diffusion base an adapter can be trained on, identified by its fingerprint."""
    __tablename__ = "base_models"
    __table_args__ = (UniqueConstraint("fingerprint", name="uq_base_models_fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(FINGERPRINT_LENGTH))
    name: Mapped[str | None] = mapped_column(String(256))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(default=utcnow)


class Tenant(Base):
    """Who owns subjects: a retailer. Migration 0003 creates tenant 1, ``default``, for older rows."""
    __tablename__ = "tenants"
    __table_args__ = (UniqueConstraint("name", name="uq_tenants_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key bound to one tenant. Only its sha256 is stored (keys are 256-bit random tokens)."""
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_api_keys_tenant_id"))
    key_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    prefix: Mapped[str | None] = mapped_column(String(16))  # the key's first characters, public (None: pre-0005)
    last_used: Mapped[datetime | None] = mapped_column()  # stamped at most once a minute


class Subject(Base):
    """A product: a name unique within its tenant, display metadata, and a version counter that
    never goes back."""
    __tablename__ = "subjects"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_subjects_tenant_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", name="fk_subjects_tenant_id"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    display: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(default=utcnow)

    adapters: Mapped[list["AdapterVersion"]] = relationship(
        back_populates="subject", cascade="all, delete-orphan", passive_deletes=True)


class AdapterVersion(Base):
    """One registered adapter: a version of a subject pointing at a content-addressed blob."""
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("subject_id", "version", name="uq_adapters_subject_version"),
        Index("ix_adapters_sha256", "sha256"),
        Index("ix_adapters_base_fingerprint", "base_fingerprint"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subject_id: Mapped[int] = mapped_column(
        ForeignKey("subjects.id", ondelete="CASCADE", name="fk_adapters_subject_id"))
    version: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    target_modules: Mapped[list[str] | None] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(32))
    byte_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    base_fingerprint: Mapped[str | None] = mapped_column(String(FINGERPRINT_LENGTH))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(default=utcnow)

    subject: Mapped[Subject] = relationship(back_populates="adapters")


class Job(Base):
    """A registration job: train an adapter for ``name`` from ``photos`` (blob hashes) with ``recipe``
    (override fields). Any process reads it; ``subjectpaint worker`` processes claim it with a lease
    (``lease_owner`` until ``lease_expires``, epoch seconds) and heartbeat while training; ``checkpoint``
    is the blob of its last Lightning checkpoint, so a job whose worker died resumes elsewhere."""
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_state_created", "state", "created"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_jobs_tenant_id"))
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    state: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int] = mapped_column(Integer)
    ref: Mapped[str | None] = mapped_column(String(NAME_LENGTH + 16))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    photos: Mapped[list[str]] = mapped_column(JSON, default=list)
    recipe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    updated: Mapped[datetime] = mapped_column(default=utcnow)


class Reply(Base):
    """The first answer to a request sent with an ``Idempotency-Key``: a retry gets it back verbatim."""
    __tablename__ = "replies"
    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_replies_tenant_key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE", name="fk_replies_tenant_id"))
    key: Mapped[str] = mapped_column(String(256))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(128))
    headers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime] = mapped_column(default=utcnow)
