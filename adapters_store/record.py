"""What the registry hands out: plain frozen values, never live ORM objects (safe across threads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from .schema import AdapterVersion


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter version, detached from the database."""
    name: str
    version: int
    sha256: str
    byte_size: int
    dtype: str
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...] | None
    base_fingerprint: str | None
    created: datetime
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    training: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    metrics: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    tenant: str = "default"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class GcReport:
    removed_blobs: int
    removed_temp: int
    bytes_freed: int
    kept_blobs: int


def record_from_row(row: AdapterVersion, name: str, tenant: str = "default") -> AdapterRecord:
    created = row.created if row.created.tzinfo else row.created.replace(tzinfo=timezone.utc)
    return AdapterRecord(
        name=name, version=row.version, sha256=row.sha256, byte_size=row.byte_size, dtype=row.dtype,
        rank=row.rank, alpha=row.alpha, base_fingerprint=row.base_fingerprint, created=created,
        target_modules=tuple(row.target_modules) if row.target_modules is not None else None,
        metadata=dict(row.meta or {}), training=dict(row.training or {}),
        metrics=dict(row.metrics or {}), tenant=tenant)
