"""Registry: the SQL index of adapters (names, versions, metadata, blob hashes) over a blob store.

Writes are blob first (atomic, content-addressed), then the row in one transaction; a crash leaves
at most an unreferenced blob, which :meth:`Registry.gc` collects. Every read from the blob store
verifies the sha256. This class is the only place that opens SQLAlchemy sessions; callers get
:class:`AdapterRecord` values (frozen, safe to pass between threads).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from . import adapter_file
from .blobs import BlobStore, sha256_hex
from .cache import AdapterCache
from .database import WRITE, make_engine, normalize_url, upgrade
from .errors import (AdapterCorrupt, AdapterNotFound, InvalidAdapter, InvalidName, RegistryBusy,
                     StorageFull, StorageUnavailable, StoreError, VersionExists)
from .jobs import active_job_blobs
from .naming import parse_ref, validate_name
from .record import AdapterRecord, GcReport, record_from_row
from .schema import FINGERPRINT_LENGTH, AdapterVersion, BaseModel, Subject
from .tenants import DEFAULT_TENANT, TenantAdmin

T = TypeVar("T")
_HASHER: ThreadPoolExecutor | None = None


def _hasher() -> ThreadPoolExecutor:
    """One background thread that hashes blobs while the caller decodes them."""
    global _HASHER
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(1, thread_name_prefix="adapters-store-sha256")
    return _HASHER


def _forget_hasher() -> None:
    global _HASHER
    _HASHER = None  # a forked child has the executor but not its thread: work sent there would never run


os.register_at_fork(after_in_child=_forget_hasher)


def default_home() -> str:
    return os.path.expanduser(os.environ.get("SUBJECTPAINT_HOME") or "~/.subjectpaint")


def default_url() -> str:
    return (os.environ.get("SUBJECTPAINT_REGISTRY_URL")
            or f"sqlite:///{os.path.join(default_home(), 'registry.db')}")


def default_blobs() -> str:
    return os.environ.get("SUBJECTPAINT_BLOBS") or os.path.join(default_home(), "blobs")


def _json_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidAdapter(f"{what} must be a dict")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"{what} is not JSON-able: {exc}") from None


class _Conflict(Exception):
    """Raised inside a transaction when a concurrent writer changed what it read: retry it."""


def storage_error(exc: Exception) -> StoreError:
    """The typed error of a database or blob-store fault that retrying now will not fix: a full disk is
    `StorageFull`, a read-only / failing / missing store `StorageUnavailable`; a constraint violation stays a
    plain `StoreError`."""
    if isinstance(exc, IntegrityError):
        return StoreError(f"database error: {exc.orig}")
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return (StorageFull if full else StorageUnavailable)(f"blob store: {exc.strerror or exc}")
    text = str(getattr(exc, "orig", exc))
    return (StorageFull if "full" in text.lower() else StorageUnavailable)(f"database: {text}")


def _retryable(exc: Exception) -> bool:
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code in ("40001", "40P01", "23505", "23503", "55P03"):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    if isinstance(exc, IntegrityError):
        return "unique" in text
    return "locked" in text or "busy" in text


class Registry(TenantAdmin):
    """``Registry(url=None, blobs=None)``: SQLAlchemy URL (default ``sqlite:///<home>/registry.db``
    or ``$SUBJECTPAINT_REGISTRY_URL``) and a blob directory or fsspec URL (default ``<home>/blobs``),
    where ``<home>`` is ``$SUBJECTPAINT_HOME`` or ``~/.subjectpaint``. Opening upgrades the schema.

    Every name-based operation is scoped to the view's tenant (``tenant``, default ``"default"``;
    ``registry.for_tenant(name)`` for another): other tenants' subjects are invisible."""

    def __init__(self, url: str | None = None, blobs: str | os.PathLike | BlobStore | None = None,
                 *, cache: AdapterCache | None = None, cache_bytes: int = 256 << 20,
                 max_retries: int = 40, tenant: str = DEFAULT_TENANT):
        self.url = normalize_url(url or default_url())
        self.engine = make_engine(self.url)
        self.backup_path = upgrade(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_session = sessionmaker(self.engine.execution_options(**WRITE),
                                           expire_on_commit=False)
        self.blobs = blobs if isinstance(blobs, BlobStore) else BlobStore(blobs or default_blobs())
        self.cache = cache if cache is not None else AdapterCache(cache_bytes)
        self.max_retries = max_retries
        self.retries = 0  # transactions retried after a lock or unique-violation race (a figure)
        self.tenant, self._tenant_pk, self._owner = validate_name(tenant), None, True
        self._views: dict[str, Registry] = {}  # for_tenant's views, shared by every view

    def __repr__(self) -> str:
        return (f"Registry({self.url.render_as_string(hide_password=True)!r}, {self.blobs.url!r}, "
                f"tenant={self.tenant!r})")

    def close(self) -> None:
        if self._owner:   # a tenant view shares its parent's engine
            self.engine.dispose()

    def _record(self, row: AdapterVersion, name: str) -> AdapterRecord:
        return record_from_row(row, name, self.tenant)

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------
    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction, retrying lock and unique-violation races."""
        for attempt in range(self.max_retries):
            try:
                with self._write_session.begin() as session:
                    return fn(session)
            except (OperationalError, IntegrityError, _Conflict) as exc:
                if not isinstance(exc, _Conflict) and not _retryable(exc):
                    raise storage_error(exc) from exc
                if attempt == self.max_retries - 1:
                    kind = VersionExists if isinstance(exc, IntegrityError) else RegistryBusy
                    raise kind(f"gave up after {self.max_retries} attempts: "
                               f"{getattr(exc, 'orig', exc)}") from exc
                self.retries += 1
                time.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** attempt)))
        raise AssertionError("unreachable")

    # -- register --------------------------------------------------------------------------
    def register(self, name: str, tensors_or_file: Mapping[str, torch.Tensor] | str | os.PathLike,
                 metadata: Mapping[str, Any] | None = None, base_fingerprint: str | None = None,
                 *, training: Mapping[str, Any] | None = None,
                 metrics: Mapping[str, Any] | None = None,
                 display: Mapping[str, Any] | None = None) -> AdapterRecord:
        """Store an adapter as the next version of ``name``. Validation happens before anything is
        written: a bad name, tensor, metadata or file raises and leaves no row and no blob."""
        validate_name(name)
        if isinstance(tensors_or_file, (str, os.PathLike)):
            tensors, file_meta = adapter_file.read_raw(tensors_or_file)
            given = {k: v for k, v in file_meta.items() if k not in adapter_file.ENTRY_KEYS}
            given.update(metadata or {})
        else:
            tensors, given = tensors_or_file, dict(metadata or {})
        tensors = adapter_file.check_tensors(tensors)
        meta = _json_dict(given, "metadata")                # the row keeps all of it
        header = adapter_file.stringify_metadata(            # the blob only the content's part
            {k: v for k, v in given.items() if k not in adapter_file.ENTRY_KEYS})
        training, metrics = _json_dict(training, "training"), _json_dict(metrics, "metrics")
        display = _json_dict(display, "display")
        if base_fingerprint is None:
            base_fingerprint = header.get("base_fingerprint")
        if base_fingerprint is not None:
            if not isinstance(base_fingerprint, str) or not 0 < len(base_fingerprint) <= FINGERPRINT_LENGTH:
                raise InvalidAdapter(f"base_fingerprint must be a str of 1..{FINGERPRINT_LENGTH} chars")
            header["base_fingerprint"] = base_fingerprint
        described = adapter_file.describe(tensors, given)
        for key in ("rank", "alpha", "target_modules"):
            if key not in header and described[key] is not None:
                header[key] = (json.dumps(described[key]) if key == "target_modules"
                               else str(described[key]))
        data = adapter_file.encode(tensors, header)

        try:
            sha = self.blobs.put(data)                   # 1. blob (atomic, deduplicated)
        except OSError as exc:
            raise storage_error(exc) from exc

        def insert(session: Session) -> AdapterRecord:   # 2. row, one transaction
            tenant_id = self._tenant_id(session)
            subject = session.scalar(select(Subject).where(Subject.tenant_id == tenant_id,
                                                           Subject.name == name))
            if subject is None:
                subject = Subject(tenant_id=tenant_id, name=name, display=display, last_version=0)
                session.add(subject)
                session.flush()
            bumped = session.execute(update(Subject).where(Subject.id == subject.id)
                                     .values(last_version=Subject.last_version + 1)
                                     .execution_options(synchronize_session=False)).rowcount
            if bumped != 1:   # the name was deleted between our read and our update
                raise _Conflict(name)
            version = session.scalar(select(Subject.last_version).where(Subject.id == subject.id))
            row = AdapterVersion(
                subject_id=subject.id, version=version, rank=described["rank"],
                alpha=described["alpha"], target_modules=described["target_modules"],
                dtype=described["dtype"], byte_size=len(data), sha256=sha,
                base_fingerprint=base_fingerprint, meta=meta, training=training, metrics=metrics)
            session.add(row)
            session.flush()
            return self._record(row, name)

        record = self._write(insert)
        if not self.blobs.exists(sha):                   # 3. a concurrent gc raced us: rewrite
            self.blobs.put(data)
        return record

    def import_(self, path: str | os.PathLike, name: str | None = None) -> AdapterRecord:
        """Register an interchange file; the name comes from its ``subject`` metadata unless given."""
        tensors, meta = adapter_file.read_raw(path)
        name = name or meta.get("subject")
        if not name:
            raise InvalidName(f"{os.fspath(path)!r} has no 'subject' metadata; pass name=")
        given = {k: v for k, v in meta.items() if k not in adapter_file.ENTRY_KEYS}
        return self.register(name, tensors, given)

    def add_base(self, fingerprint: str, name: str | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        """Record a base model (idempotent: an existing fingerprint is left as it is)."""
        if not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= FINGERPRINT_LENGTH:
            raise InvalidAdapter("fingerprint must be a non-empty str")
        config = _json_dict(config, "config")

        def add(session: Session) -> None:
            if session.scalar(select(BaseModel.id).where(BaseModel.fingerprint == fingerprint)) is None:
                session.add(BaseModel(fingerprint=fingerprint, name=name, config=config))

        self._write(add)

    def bases(self) -> list[dict[str, Any]]:
        with self._read() as session:
            rows = session.scalars(select(BaseModel).order_by(BaseModel.id))
            return [{"fingerprint": b.fingerprint, "name": b.name, "config": dict(b.config)}
                    for b in rows]

    # -- read ------------------------------------------------------------------------------
    def get(self, ref: str) -> AdapterRecord:
        """``"name"`` (latest version) or ``"name@3"``."""
        name, version = parse_ref(ref)
        stmt = select(AdapterVersion).join(Subject).where(Subject.name == name)
        if version is None:
            stmt = stmt.order_by(AdapterVersion.version.desc()).limit(1)
        else:
            stmt = stmt.where(AdapterVersion.version == version)
        with self._read() as session:
            row = session.scalar(stmt.where(Subject.tenant_id == self._tenant_id(session)))
            if row is None:
                raise AdapterNotFound(ref)
            return self._record(row, name)

    def exists(self, ref: str) -> bool:
        try:
            self.get(ref)
            return True
        except AdapterNotFound:
            return False

    def list(self, prefix: str | None = None, base_fingerprint: str | None = None, *,
             limit: int | None = 100, offset: int = 0, after: str | None = None,
             latest_only: bool = False) -> list[AdapterRecord]:
        """Records ordered by (name, version). Page with ``limit``/``offset``, or keyset-style with
        ``after=last_record.ref`` (stable and fast at any depth)."""
        stmt = select(AdapterVersion, Subject.name).join(Subject)
        if prefix:
            stmt = stmt.where(Subject.name.startswith(prefix, autoescape=True),
                              func.substr(Subject.name, 1, len(prefix)) == prefix)
        if base_fingerprint is not None:
            stmt = stmt.where(AdapterVersion.base_fingerprint == base_fingerprint)
        if latest_only:
            newer = aliased(AdapterVersion)
            stmt = stmt.where(AdapterVersion.version == select(func.max(newer.version))
                              .where(newer.subject_id == Subject.id).scalar_subquery())
        if after is not None:
            name, version = parse_ref(after)
            if version is None:
                raise InvalidName(f"after= needs a name@version cursor, got {after!r}")
            stmt = stmt.where(or_(Subject.name > name,
                                  and_(Subject.name == name, AdapterVersion.version > version)))
        stmt = stmt.order_by(Subject.name, AdapterVersion.version).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as session:
            stmt = stmt.where(Subject.tenant_id == self._tenant_id(session))
            return [self._record(row, name) for row, name in session.execute(stmt)]

    def count(self) -> int:
        """Adapter versions of this view's tenant."""
        with self._read() as session:
            return session.scalar(select(func.count()).select_from(AdapterVersion).join(Subject)
                                  .where(Subject.tenant_id == self._tenant_id(session)))

    def _blob(self, record: AdapterRecord) -> bytes:
        try:
            return self.blobs.read(record.sha256)
        except FileNotFoundError:
            raise AdapterCorrupt(record.ref, record.sha256, "is missing") from None

    @staticmethod
    def _check(record: AdapterRecord, data: bytes, actual: str) -> None:
        if actual != record.sha256:
            raise AdapterCorrupt(record.ref, record.sha256,
                                 f"does not verify: its {len(data)} bytes hash to {actual}")

    @contextlib.contextmanager
    def verifying(self, record: AdapterRecord | str) -> Iterator[dict[str, torch.Tensor]]:
        """The adapter's decoded tensors while its blob's sha256 is computed beside the caller (hashlib
        releases the GIL): the block may prepare from them (lay out, convert) but must not publish.
        Leaving the block waits for the hash and raises `AdapterCorrupt` if the bytes are not the ones
        registered, also when the block itself failed on them, so nothing made from them escapes.
        The tensors are the decoder's own (no copies) and are not cached here."""
        record = self._own(record)
        data = self._blob(record)
        digest = _hasher().submit(sha256_hex, data)
        try:
            tensors = adapter_file.decode(data)  # the Rust parser bounds-checks; never unpickles
        except InvalidAdapter as exc:
            self._check(record, data, digest.result())
            raise AdapterCorrupt(record.ref, record.sha256, str(exc)) from None  # hashes right: bad at write
        try:
            yield tensors
        finally:  # on a failed block too: corrupt bytes are reported as such, not as the block's error
            self._check(record, data, digest.result())

    def _decode_verified(self, record: AdapterRecord) -> dict[str, torch.Tensor]:
        with self.verifying(record) as tensors:
            return tensors

    def _own(self, record: AdapterRecord | str) -> AdapterRecord:
        if not isinstance(record, AdapterRecord):
            return self.get(record)
        if record.tenant != self.tenant:  # a record handed out by another tenant's view
            raise AdapterNotFound(record.ref)
        return record

    def load(self, record: AdapterRecord | str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (fresh copies). Blob bytes are verified against the row's sha256
        before decoding; only verified tensors enter the RAM cache."""
        record = self._own(record)
        cached = self.cache.get_or_load(record.sha256, lambda: self._decode_verified(record))
        return {k: v.clone() for k, v in cached.items()}

    def verify(self, ref: str | None = None) -> list[str]:
        """Re-hash blobs on disk (one adapter, or all); returns the refs that fail, and drops their
        blobs from the RAM cache so the next ``load`` re-reads (and refuses) them."""
        records = [self.get(ref)] if ref else self._all()
        bad = []
        for rec in records:
            if not self.blobs.verified(rec.sha256):
                self.cache.discard(rec.sha256)
                bad.append(rec.ref)
        return bad

    def _all(self) -> list[AdapterRecord]:
        out, after = [], None
        while page := self.list(limit=1000, after=after):
            out.extend(page)
            after = page[-1].ref
        return out

    # -- delete / gc / export --------------------------------------------------------------
    def delete(self, ref: str) -> int:
        """Delete ``name`` (every version, and the name) or ``name@v``. Returns rows deleted.
        Blobs stay until :meth:`gc`. Version numbers of a kept name are never reused."""
        name, version = parse_ref(ref)

        def remove(session: Session) -> int:
            subject_id = session.scalar(select(Subject.id).where(
                Subject.tenant_id == self._tenant_id(session), Subject.name == name))
            if subject_id is None:
                raise AdapterNotFound(ref)
            where = AdapterVersion.subject_id == subject_id
            if version is not None:
                where = and_(where, AdapterVersion.version == version)
            n = session.execute(delete(AdapterVersion).where(where)
                                .execution_options(synchronize_session=False)).rowcount
            if version is None:
                session.execute(delete(Subject).where(Subject.id == subject_id)
                                .execution_options(synchronize_session=False))
            elif n == 0:
                raise AdapterNotFound(ref)
            return n

        return self._write(remove)

    def gc(self, grace_seconds: float = 3600.0) -> GcReport:
        """Remove blobs no row references and temp files left by crashed writes, if older than
        ``grace_seconds`` (the grace protects writes in flight; pass 0 when nothing else runs)."""
        with self._read() as session:
            referenced = set(session.scalars(select(AdapterVersion.sha256).distinct()))
            referenced |= active_job_blobs(session)   # photos and checkpoints of queued / running jobs
        now = time.time()
        removed = kept = freed = 0
        for blob in self.blobs.blobs():
            if blob.sha256 in referenced:
                kept += 1
                continue
            if now - blob.mtime < grace_seconds:
                kept += 1
                continue
            try:
                freed += os.path.getsize(blob.path) if self.blobs.local else 0
            except OSError:
                pass
            self.blobs.remove(blob)
            if blob.sha256:
                self.cache.discard(blob.sha256)
            removed += 1
        temp = 0
        for item in self.blobs.temp_files():
            if now - item.mtime >= grace_seconds:
                self.blobs.remove(item)
                temp += 1
        return GcReport(removed, temp, freed, kept)

    def export(self, ref: str, path: str | os.PathLike) -> AdapterRecord:
        """Write ``ref`` as an interchange file (blob metadata + subject, version, created)."""
        record = self.get(ref)
        data = self._blob(record)
        self._check(record, data, sha256_hex(data))
        header = adapter_file.header_metadata(data)
        header.update(subject=record.name, version=str(record.version),
                      created=record.created.isoformat())
        out = adapter_file.encode(adapter_file.decode(data), header)
        path = os.path.abspath(os.fspath(path))
        tmp = f"{path}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
        try:
            with open(tmp, "wb") as f:
                f.write(out)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return record
