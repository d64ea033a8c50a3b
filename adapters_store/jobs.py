"""Durable registration jobs: rows in the registry database, claimed by worker processes with leases.

A job is ``queued`` until a worker claims it (the oldest first), ``running`` while the worker holds its
lease and heartbeats, then ``done`` (with the registered ``ref``), ``failed`` (with the error) or
``cancelled``. A worker that dies stops heartbeating; once its lease expires any worker claims the job
again and resumes from its last checkpoint blob. A job claimed ``max_attempts`` times fails with the last
error recorded. Claiming is one statement: ``UPDATE jobs ... WHERE id = (SELECT id ... ORDER BY created
LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id`` on Postgres (concurrent workers skip each other's rows);
on SQLite the same conditional update runs under ``BEGIN IMMEDIATE`` (one writer at a time).

The photos and checkpoints are content-addressed blobs in the registry's blob store (any worker can read
them); they are removed when the job ends, and ``Registry.gc`` keeps those of active jobs.

Every call goes through the registry's ``_read`` / ``_write`` sessions (retries on lock races); this
module opens none itself. Update statements that act on a claimed job name its lease owner, so a worker
that lost its lease (expired and claimed elsewhere, or the job was cancelled) changes nothing.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from .blobs import StoredFile, sha256_hex
from .errors import InvalidAdapter, StoreError, TenantNotFound
from .naming import validate_name
from .schema import AdapterVersion, Job, Tenant, utcnow

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
DEFAULT_MAX_ATTEMPTS = 3


class QueueFull(StoreError):
    """More jobs are queued or running than the caller's limit allows (retry later)."""


class IdempotencyMismatch(StoreError, ValueError):
    """An ``Idempotency-Key`` reused with a different request."""


@dataclass(frozen=True)
class JobRecord:
    """One job, detached from the database."""
    id: str
    tenant: str
    name: str
    state: str
    step: int
    steps: int
    ref: str | None
    error: str | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires: float | None
    photos: tuple[str, ...]
    recipe: Mapping[str, Any]
    checkpoint: str | None
    created: datetime
    updated: datetime

    def public(self) -> dict[str, Any]:
        """What the HTTP API shows: no tenant, lease or blob hashes."""
        out = {k: v for k, v in asdict(self).items()
               if k in ("id", "name", "state", "step", "steps", "ref", "error", "attempts")}
        out["progress"] = round(self.step / self.steps, 4) if self.steps else 0.0
        out["created"], out["updated"] = self.created.isoformat(), self.updated.isoformat()
        return out


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _record(row: Job, tenant: str) -> JobRecord:
    return JobRecord(row.id, tenant, row.name, row.state, row.step, row.steps, row.ref, row.error, row.attempts,
                     row.max_attempts, row.lease_owner, row.lease_expires, tuple(row.photos or ()),
                     dict(row.recipe or {}), row.checkpoint, _aware(row.created), _aware(row.updated))


def active_job_blobs(session: Session) -> set[str]:
    """Blob hashes that queued and running jobs still need (photos, last checkpoint): ``gc`` keeps them."""
    out: set[str] = set()
    for photos, checkpoint in session.execute(select(Job.photos, Job.checkpoint).where(Job.state.in_(ACTIVE))):
        out.update(photos or ())
        if checkpoint:
            out.add(checkpoint)
    return out


class JobQueue:
    """``JobQueue(registry)``: the jobs of one registry database (every tenant). Blobs go to the
    registry's blob store."""

    def __init__(self, registry, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError("max_attempts must be a positive int")
        self.registry, self.blobs, self.max_attempts = registry, registry.blobs, max_attempts

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _tenant_pk(session: Session, tenant: str) -> int:
        pk = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        if pk is None:
            raise TenantNotFound(f"tenant {tenant!r} does not exist")
        return pk

    def _row(self, session: Session, job_id: str) -> tuple[Job, str] | None:
        found = session.execute(select(Job, Tenant.name).join(Tenant, Tenant.id == Job.tenant_id)
                                .where(Job.id == job_id)).first()
        return (found[0], found[1]) if found else None

    def _drop_blobs(self, shas: Sequence[str]) -> None:
        """Remove blobs an ended job used, unless an adapter or another active job references them."""
        shas = {s for s in shas if s}
        if not shas:
            return
        with self.registry._read() as session:
            used = active_job_blobs(session)
            used.update(session.scalars(select(AdapterVersion.sha256).where(AdapterVersion.sha256.in_(shas))))
        for sha in shas - used:
            try:
                path = self.blobs.path(sha)
            except ValueError:
                continue
            self.blobs.remove(StoredFile(path, sha, 0.0))

    # -- submit / read / cancel (any process, tenant-scoped) -------------------------------
    def submit(self, tenant: str, name: str, photos: Sequence[bytes], steps: int,
               recipe: Mapping[str, Any] | None = None, *, idempotency_key: str | None = None,
               request_hash: str | None = None, max_active: int | None = None,
               admit: Callable[[dict[str, int], int], None] | None = None) -> tuple[JobRecord, bool]:
        """Queue a job; returns ``(job, created)``. With ``idempotency_key``, a job already submitted under
        that key (by this tenant) is returned instead, ``created=False``, if its ``request_hash`` matches
        (``IdempotencyMismatch`` if not). ``max_active``: refuse (``QueueFull``) when that many jobs of all
        tenants are queued or running. ``admit(tenant_counts, total_active)``: the caller's admission policy,
        called in the inserting transaction with this tenant's ``{"queued": n, "running": n}`` and the queued
        + running jobs of all tenants; it refuses by raising. Photos are stored as blobs before the row (a
        crash or a refusal leaves at most unreferenced blobs, for ``gc``)."""
        validate_name(name)
        if not isinstance(steps, int) or steps < 1:
            raise InvalidAdapter(f"steps must be a positive int, got {steps!r}")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= 256:
            raise InvalidAdapter("an idempotency key must be 1..256 characters")
        if idempotency_key is not None:
            found = self.by_key(tenant, idempotency_key, request_hash)
            if found is not None:
                return found, False
        shas = [self.blobs.put(bytes(p)) for p in photos]
        recipe = dict(recipe or {})

        def insert(session: Session) -> tuple[JobRecord, bool]:
            tenant_pk = self._tenant_pk(session, tenant)
            if idempotency_key is not None:   # on a retry after losing the unique race, the winner is here
                found = self._keyed(session, tenant_pk, idempotency_key, request_hash)
                if found is not None:
                    return _record(found, tenant), False
            if max_active is not None:
                active = session.scalar(select(func.count()).select_from(Job).where(Job.state.in_(ACTIVE)))
                if active >= max_active:
                    raise QueueFull(f"{active} training jobs are queued or running (limit {max_active}); "
                                    "retry later")
            if admit is not None:
                mine = dict(session.execute(select(Job.state, func.count()).where(
                    Job.tenant_id == tenant_pk, Job.state.in_(ACTIVE)).group_by(Job.state)).all())
                total = session.scalar(select(func.count()).select_from(Job).where(Job.state.in_(ACTIVE)))
                admit({s: int(mine.get(s, 0)) for s in ACTIVE}, int(total))
            now = utcnow()
            row = Job(id=uuid.uuid4().hex, tenant_id=tenant_pk, name=name, state="queued", step=0, steps=steps,
                      attempts=0, max_attempts=self.max_attempts, photos=shas, recipe=recipe,
                      idempotency_key=idempotency_key, request_hash=request_hash, created=now, updated=now)
            session.add(row)
            session.flush()
            return _record(row, tenant), True

        return self.registry._write(insert)

    @staticmethod
    def _keyed(session: Session, tenant_pk: int, key: str, request_hash: str | None) -> Job | None:
        row = session.scalar(select(Job).where(Job.tenant_id == tenant_pk, Job.idempotency_key == key))
        if row is not None and request_hash is not None and row.request_hash not in (None, request_hash):
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
        return row

    def by_key(self, tenant: str, key: str, request_hash: str | None) -> JobRecord | None:
        with self.registry._read() as session:
            row = self._keyed(session, self._tenant_pk(session, tenant), key, request_hash)
            return _record(row, tenant) if row is not None else None

    def get(self, tenant: str, job_id: str) -> JobRecord | None:
        """The job, or None if it does not exist or belongs to another tenant (the same answer)."""
        with self.registry._read() as session:
            found = self._row(session, str(job_id))
        return _record(*found) if found and found[1] == tenant else None

    def pending(self, tenant: str, name: str) -> bool:
        """Whether a queued or running job of ``tenant`` trains ``name``."""
        with self.registry._read() as session:
            return session.scalar(select(func.count()).select_from(Job).join(Tenant, Tenant.id == Job.tenant_id)
                                  .where(Tenant.name == tenant, Job.name == name, Job.state.in_(ACTIVE))) > 0

    def counts(self) -> dict[str, int]:
        with self.registry._read() as session:
            rows = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        return {s: int(rows.get(s, 0)) for s in STATES}

    def cancel(self, tenant: str, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job (a running job's worker stops at its next heartbeat). Returns the
        job as it now is (an ended job unchanged), or None if not found for this tenant."""
        def cancel(session: Session):
            found = self._row(session, str(job_id))
            if found is None or found[1] != tenant:
                return None, ()
            row, blobs = found[0], ()
            if row.state == "queued":  # nobody else holds it: its blobs go now
                blobs = (*row.photos, row.checkpoint)
                row.photos, row.checkpoint = [], None
            if row.state in ACTIVE:    # a running job's worker sees it at its next heartbeat and cleans up
                row.state, row.updated = "cancelled", utcnow()
            session.flush()
            return _record(row, tenant), blobs

        job, blobs = self.registry._write(cancel)
        self._drop_blobs(blobs)
        return job

    # -- worker side -----------------------------------------------------------------------
    def claim(self, owner: str, lease_seconds: float) -> JobRecord | None:
        """Take the oldest claimable job (queued, or running with an expired lease) for ``owner`` until
        ``now + lease_seconds``; None if there is none. Expired jobs out of attempts fail first."""
        self._fail_exhausted()
        now = time.time()
        claimable = and_(or_(Job.state == "queued", and_(Job.state == "running", Job.lease_expires < now)),
                         Job.attempts < Job.max_attempts)
        pick = (select(Job.id).where(claimable).order_by(Job.created, Job.id).limit(1)
                .with_for_update(skip_locked=True).scalar_subquery())

        def take(session: Session) -> JobRecord | None:
            job_id = session.scalar(
                update(Job).where(Job.id == pick)
                .values(state="running", lease_owner=owner, lease_expires=now + lease_seconds,
                        attempts=Job.attempts + 1, updated=utcnow())
                .returning(Job.id).execution_options(synchronize_session=False))
            if job_id is None:
                return None
            return _record(*self._row(session, job_id))

        return self.registry._write(take)

    def _fail_exhausted(self) -> None:
        now = time.time()

        def sweep(session: Session) -> list:
            rows = session.scalars(select(Job).where(Job.state == "running", Job.lease_expires < now,
                                                     Job.attempts >= Job.max_attempts)).all()
            blobs = []
            for row in rows:
                lost = f"its worker stopped heartbeating on attempt {row.attempts} of {row.max_attempts}"
                row.error = f"{row.error} (then {lost})" if row.error else lost
                row.state, row.lease_owner, row.lease_expires, row.updated = "failed", None, None, utcnow()
                blobs += [*row.photos, row.checkpoint]
                row.photos, row.checkpoint = [], None
            return blobs

        self._drop_blobs(self.registry._write(sweep))

    def _owned(self, job_id: str, owner: str):
        return and_(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float, step: int | None = None) -> bool:
        """Extend the lease (and record progress). False if the job is no longer this worker's to run
        (cancelled, or its lease expired and another worker claimed it): stop working on it."""
        values: dict[str, Any] = {"lease_expires": time.time() + lease_seconds, "updated": utcnow()}
        if step is not None:
            values["step"] = int(step)
        return bool(self.registry._write(lambda s: s.execute(
            update(Job).where(self._owned(job_id, owner)).values(**values)
            .execution_options(synchronize_session=False)).rowcount))

    def save_checkpoint(self, job_id: str, owner: str, data: bytes, step: int | None = None) -> bool:
        """Store a checkpoint blob and point the job at it (the previous one is removed)."""
        sha = self.blobs.put(data)

        def point(session: Session):
            row = session.scalar(select(Job).where(self._owned(job_id, owner)))
            if row is None:
                return False, None
            old, row.checkpoint, row.updated = row.checkpoint, sha, utcnow()
            if step is not None:
                row.step = int(step)
            return True, old

        owned, old = self.registry._write(point)
        if old is not None and old != sha:
            self._drop_blobs([old])
        if not owned:
            self._drop_blobs([sha])
        return owned

    def read_blob(self, sha: str) -> bytes:
        """A job blob's bytes, verified against its hash (``StoreError`` if missing or corrupt)."""
        try:
            data = self.blobs.read(sha)
        except FileNotFoundError:
            raise StoreError(f"job blob {sha} is missing") from None
        if sha256_hex(data) != sha:
            raise StoreError(f"job blob {sha} does not verify")
        return data

    def _end(self, job_id: str, owner: str, **values) -> bool:
        def end(session: Session):
            row = session.scalar(select(Job).where(self._owned(job_id, owner)))
            if row is None:
                return None
            blobs = [*row.photos, row.checkpoint]
            for key, value in values.items():
                setattr(row, key, value(row) if callable(value) else value)
            row.lease_owner, row.lease_expires, row.updated = None, None, utcnow()
            if row.state != "queued":
                row.photos, row.checkpoint = [], None
                return blobs
            return []

        blobs = self.registry._write(end)
        if blobs:
            self._drop_blobs(blobs)
        return blobs is not None

    def complete(self, job_id: str, owner: str, ref: str, steps: int | None = None) -> bool:
        """Mark done with the registered ``ref``. False if the job was no longer this worker's (the caller
        decides what to do with what it registered)."""
        values: dict[str, Any] = {"state": "done", "ref": ref, "error": None}
        if steps is not None:
            values["step"] = steps
        return self._end(job_id, owner, **values)

    def fail(self, job_id: str, owner: str, error: str, *, retry: bool = False) -> str | None:
        """Record ``error``; with ``retry`` and attempts left the job is queued again (from its checkpoint),
        else it fails. Returns the new state, or None if the job was no longer this worker's."""
        with self.registry._read() as session:
            row = session.scalar(select(Job).where(self._owned(job_id, owner)))
            left = row is not None and row.attempts < row.max_attempts
        state = "queued" if retry and left else "failed"
        return state if self._end(job_id, owner, state=state, error=str(error)[:4000]) else None

    def release(self, job_id: str, owner: str) -> bool:
        """Give a job back (a worker shutting down): queued again, this attempt not counted."""
        return self._end(job_id, owner, state="queued", attempts=lambda row: max(0, row.attempts - 1))

    def discard(self, job_id: str) -> None:
        """Remove the blobs of a job that ended without its worker (cancelled while running)."""
        def clear(session: Session) -> list:
            row = session.scalar(select(Job).where(Job.id == job_id, Job.state.not_in(ACTIVE)))
            if row is None:
                return []
            blobs = [*row.photos, row.checkpoint]
            row.photos, row.checkpoint = [], None
            return blobs

        self._drop_blobs(self.registry._write(clear))

    def state(self, job_id: str) -> str | None:
        with self.registry._read() as session:
            return session.scalar(select(Job.state).where(Job.id == job_id))
