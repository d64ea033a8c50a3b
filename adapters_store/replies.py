"""Idempotent replies: the first answer to a request sent with an ``Idempotency-Key``, kept in the registry
database so that a client's retry, through any serve process, gets that answer back and nothing is done twice.

A key belongs to one tenant; reusing it with a different request (another ``request_hash``) is refused with
``IdempotencyMismatch``. Two concurrent first requests both compute; the first stored answer wins and both
callers return it. Replies older than ``ttl_seconds`` are forgotten (deleted when a new one is stored).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from .jobs import IdempotencyMismatch
from .schema import Reply, Tenant, utcnow

DEFAULT_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class StoredReply:
    status: int
    media_type: str
    headers: Mapping[str, str]
    body: bytes


class Replies:
    """``Replies(registry)``: uses the registry's sessions; opens none itself."""

    def __init__(self, registry, ttl_seconds: float = DEFAULT_TTL_SECONDS):
        self.registry, self.ttl = registry, timedelta(seconds=ttl_seconds)

    @staticmethod
    def _tenant_pk(session: Session, tenant: str) -> int | None:
        return session.scalar(select(Tenant.id).where(Tenant.name == tenant))

    def _find(self, session: Session, tenant: str, key: str, request_hash: str) -> StoredReply | None:
        row = session.scalar(select(Reply).join(Tenant, Tenant.id == Reply.tenant_id)
                             .where(Tenant.name == tenant, Reply.key == key))
        if row is None or row.created.replace(tzinfo=None) < (utcnow() - self.ttl).replace(tzinfo=None):
            return None
        if row.request_hash != request_hash:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
        return StoredReply(row.status, row.media_type, dict(row.headers or {}), bytes(row.body))

    def get(self, tenant: str, key: str, request_hash: str) -> StoredReply | None:
        with self.registry._read() as session:
            return self._find(session, tenant, key, request_hash)

    def put(self, tenant: str, key: str, request_hash: str, status: int, media_type: str, body: bytes,
            headers: Mapping[str, Any] | None = None) -> StoredReply:
        """Store the answer unless one is stored already; returns the stored one (the first)."""
        def put(session: Session) -> StoredReply:
            found = self._find(session, tenant, key, request_hash)
            if found is not None:
                return found
            pk = self._tenant_pk(session, tenant)
            session.execute(delete(Reply).where(Reply.tenant_id == pk, Reply.key == key)
                            .execution_options(synchronize_session=False))   # an expired one
            session.execute(delete(Reply).where(Reply.created < utcnow() - self.ttl)
                            .execution_options(synchronize_session=False))
            session.add(Reply(tenant_id=pk, key=key, request_hash=request_hash, status=status,
                              media_type=media_type, headers={str(k): str(v) for k, v in (headers or {}).items()},
                              body=bytes(body)))
            session.flush()
            return StoredReply(status, media_type, dict(headers or {}), bytes(body))

        return self.registry._write(put)
