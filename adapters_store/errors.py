"""Typed errors of the adapter store. Every one is a :class:`StoreError`.

``subjectpaint.errors`` re-exports these, so SDK users catch one family.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``adapters_store``."""


class InvalidName(StoreError, ValueError):
    """A subject name or ``name@version`` reference is not acceptable."""


class InvalidAdapter(StoreError, ValueError):
    """Tensors, metadata or an adapter file given to the store are not acceptable."""


class AdapterFileError(InvalidAdapter):
    """An adapter file or tensor set that is not a valid interchange adapter (``adapters_store.adapter_file``)."""


class AdapterNotFound(StoreError, LookupError):
    """No adapter matches the name or ``name@version``."""

    def __init__(self, ref: str, detail: str = ""):
        self.ref = ref
        super().__init__(f"adapter {ref!r} not found" + (f": {detail}" if detail else ""))


class AdapterCorrupt(StoreError):
    """A stored blob is missing, truncated or does not hash to what its row says."""

    def __init__(self, ref: str, sha256: str, detail: str = ""):
        self.ref = ref
        self.sha256 = sha256
        msg = f"adapter {ref} is corrupt: blob {sha256}"
        super().__init__(msg + (f" {detail}" if detail else ""))


class VersionExists(StoreError):
    """A (subject, version) pair is already taken (raised only after retries are spent)."""


class RegistryBusy(StoreError):
    """The database stayed locked or contended for longer than the retry budget."""


class TenantNotFound(StoreError, LookupError):
    """No tenant of that name (registry views and API keys are bound to an existing tenant)."""


class InvalidKey(StoreError, PermissionError):
    """An API key that is missing, malformed, unknown or revoked. Says nothing about which."""


class StorageUnavailable(StoreError):
    """The database or blob store cannot be written or read right now (read-only, I/O error, gone): retryable."""


class StorageFull(StorageUnavailable):
    """The database or blob store has no space left."""
