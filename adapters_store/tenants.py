"""Tenants and their API keys. Every subject belongs to one tenant; a registry *view* is bound to one
tenant (``registry.for_tenant("acme")``) and sees, loads, overwrites and deletes only that tenant's
subjects. Another tenant's names look exactly like names that do not exist (``AdapterNotFound``).

API keys are ``sp_`` + 43 url-safe characters (256 random bits). Only their sha256 is stored: for a
random token of that size a plain hash is as strong as a slow KDF and allows an indexed lookup.
The raw key is returned once, by :meth:`TenantAdmin.issue_key`; what identifies it afterwards is its id and
its public prefix (``sp_`` + 8 characters, 48 of the 256 bits): :meth:`TenantAdmin.keys` lists them,
:meth:`TenantAdmin.revoke_key_id` revokes by id.
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select, update

from .errors import InvalidKey, StoreError, TenantNotFound
from .naming import validate_name
from .schema import ApiKey, Tenant, utcnow

DEFAULT_TENANT = "default"
KEY_PREFIX = "sp_"
KEY_LENGTH = len(KEY_PREFIX) + 43
PREFIX_LENGTH = len(KEY_PREFIX) + 8
LAST_USED_EVERY = timedelta(minutes=1)  # last_used is stamped at most this often (a write per request is too many)


@dataclass(frozen=True)
class KeyInfo:
    """What is known about an API key besides its hash: never enough to use it."""
    id: int
    tenant: str
    prefix: str | None  # None: issued before key prefixes were kept
    label: str | None
    created: datetime
    last_used: datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _check_key_shape(key: object) -> str:
    if not isinstance(key, str) or len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX) \
            or not key.isascii():
        raise InvalidKey("invalid API key")
    return key


class TenantAdmin:
    """Tenant methods of :class:`adapters_store.Registry` (kept here so each module stays one concept).
    Uses the registry's ``_write`` / ``_read`` sessions; opens none itself."""

    tenant: str | None
    _views: dict

    def for_tenant(self, name: str) -> "TenantAdmin":
        """A view of this registry bound to tenant ``name`` (shares engine, blobs and RAM cache;
        closing a view closes nothing). Raises TenantNotFound if it does not exist. Views are made once
        per name and shared (tenants are never deleted, so a view's tenant id stays valid)."""
        view = self._views.get(name)
        if view is None:
            validate_name(name)
            view = copy.copy(self)  # shares self._views
            view.tenant, view._tenant_pk, view._owner = name, None, False
            with view._read() as session:
                view._tenant_id(session)
            self._views[name] = view
        return view

    def _tenant_id(self, session) -> int:
        if self._tenant_pk is None:
            if self.tenant is None:
                raise TenantNotFound("this registry view is not bound to a tenant")
            pk = session.scalar(select(Tenant.id).where(Tenant.name == self.tenant))
            if pk is None:
                raise TenantNotFound(f"tenant {self.tenant!r} does not exist")
            self._tenant_pk = pk
        return self._tenant_pk

    def create_tenant(self, name: str) -> str:
        """Create tenant ``name`` (idempotent). Returns the name."""
        validate_name(name)

        def add(session) -> str:
            if session.scalar(select(Tenant.id).where(Tenant.name == name)) is None:
                session.add(Tenant(name=name))
            return name

        return self._write(add)

    def tenants(self) -> list[str]:
        with self._read() as session:
            return list(session.scalars(select(Tenant.name).order_by(Tenant.name)))

    def issue_key(self, tenant: str, label: str | None = None) -> str:
        """A new API key for ``tenant``. The raw key is returned once and never stored."""
        key = new_key()

        def add(session) -> None:
            pk = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
            if pk is None:
                raise TenantNotFound(f"tenant {tenant!r} does not exist")
            session.add(ApiKey(tenant_id=pk, key_hash=hash_key(key), label=label, prefix=key[:PREFIX_LENGTH]))

        self._write(add)
        return key

    def keys(self, tenant: str) -> list[KeyInfo]:
        """Every API key of ``tenant``, oldest first: id, prefix, label, created, last used (no secret)."""
        with self._read() as session:
            pk = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
            if pk is None:
                raise TenantNotFound(f"tenant {tenant!r} does not exist")
            rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == pk).order_by(ApiKey.id)).all()
            return [KeyInfo(r.id, tenant, r.prefix, r.label, r.created, r.last_used) for r in rows]

    def revoke_key_id(self, key_id: int) -> bool:
        """Revoke the key with this id (from :meth:`keys`). True if there was one."""
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 < key_id < 2**63:
            return False
        return bool(self._write(lambda s: s.execute(
            delete(ApiKey).where(ApiKey.id == key_id).execution_options(synchronize_session=False)).rowcount))

    def tenant_for_key(self, key: object) -> str:
        """The tenant an API key belongs to; InvalidKey (one message for every failure) otherwise."""
        digest = hash_key(_check_key_shape(key))
        with self._read() as session:
            row = session.execute(select(ApiKey.key_hash, Tenant.name, ApiKey.id, ApiKey.last_used).join(Tenant)
                                  .where(ApiKey.key_hash == digest)).first()
        if row is None or not hmac.compare_digest(row[0], digest):
            raise InvalidKey("invalid API key")
        self._stamp(row[2], row[3])
        return row[1]

    def _stamp(self, key_id: int, last_used: datetime | None) -> None:
        now = utcnow()
        if last_used is not None and last_used.tzinfo is None:  # SQLite hands back naive UTC
            last_used = last_used.replace(tzinfo=timezone.utc)
        if last_used is not None and now - last_used < LAST_USED_EVERY:
            return
        try:
            self._write(lambda s: s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used=now)
                                            .execution_options(synchronize_session=False)))
        except StoreError:  # a read-only or busy database must not refuse a valid key; the stamp waits
            pass

    def revoke_key(self, key: str) -> bool:
        digest = hash_key(_check_key_shape(key))
        return bool(self._write(lambda s: s.execute(
            delete(ApiKey).where(ApiKey.key_hash == digest)
            .execution_options(synchronize_session=False)).rowcount))
